"""The container's main process: a few lines of bash that keep the image's own start
(`bash -m start_with_right_hostname.sh train`) and pass SIGTERM on to the training
processes.

Why: StopTrainingJob and a spot interruption send SIGTERM to PID 1 only, and SIGKILL
120 s later. In the Hugging Face training image PID 1 is bash, which ignores it, and the
training toolkit (sagemaker-training 5.x) installs no handler and starts the entry point
with asyncio, so the job's own handler never runs (toolkit issues #125, #173). This
wrapper traps TERM, sends it to every process running the entry script itself (torchrun
workers, or the one process the toolkit starts; not torchrun, whose own shutdown would
SIGKILL its workers after 30 s), waits for the start script to end and exits with its code.
A TERM that comes before the entry script runs is held and delivered when it starts.

It runs before the source dir is downloaded, so it uses only bash, coreutils (`tr`) and sed.
SageMaker takes ContainerEntrypoint as at most 100 strings of at most 256 characters
each; each string here stays under that, and a test holds the request to the service model.
"""

from __future__ import annotations

START = "bash -m start_with_right_hostname.sh train"


def forward_function(entry_script: str) -> str:
    """Bash function `s`: SIGTERM to each process whose second or third word is the script
    (`python -u X`, a torchrun worker; `python -- X`, the toolkit's process runner; `python X`)
    and that already catches SIGTERM (bit 15 of SigCgt: the job's handler is installed, so
    the signal is not lost to a process still importing). It fails when it signalled none."""
    # No `local`: the names are the wrapper's own (its pending flag is `q`), and it saves room.
    return ("s(){ k=1;for p in /proc/[0-9]*;do read -r a b d _ < <(tr '\\0' ' ' <$p/cmdline);"
            f"case \" $b $d \" in *\" {entry_script} \"*)m=$(sed -n 's/^SigCgt:.//p' $p/status);"
            "((0x$m>>14&1))&&kill -TERM ${p#/proc/}&&k=0;;esac;done 2>/dev/null;return $k;}")


# `$1` is the function above: two strings, because one may hold at most 256 characters.
# A SIGTERM that finds no entry process yet (the toolkit still downloading or installing
# requirements) is kept in `q` and delivered, every 0.5 s, as soon as one appears.
MAIN = ('eval "$1";trap "s||q=1" TERM;' + START + '& c=$!;'
        'while wait $c;r=$?;kill -0 $c 2>/dev/null;do while [ "$q" ]&&kill -0 $c 2>/dev/null;do sleep .5;s&&q=;done;'
        "done;exit $r")


def container_entry_point(entry_script: str) -> list[str]:
    """ContainerEntrypoint: `bash -c MAIN sm-qlora FUNCTION` ($0 names the shell in its messages)."""
    return ["bash", "-c", MAIN, "sm-qlora", forward_function(entry_script)]
