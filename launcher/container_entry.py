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

It runs before the source dir is downloaded, so it uses only bash and coreutils (`tr`).
SageMaker takes ContainerEntrypoint as at most 100 strings of at most 256 characters
each; each string here stays under that, and a test holds the request to the service model.
"""

from __future__ import annotations

START = "bash -m start_with_right_hostname.sh train"


def forward_function(entry_script: str) -> str:
    """Bash function `s`: SIGTERM to each process whose second or third word is the script:
    `python -u X` (a torchrun worker), `python -- X` (the toolkit's process runner), `python X`."""
    return ("s(){ local p a b c;for p in /proc/[0-9]*;do read -r a b c _ < <(tr '\\0' ' ' <$p/cmdline);"
            f"case \" $b $c \" in *\" {entry_script} \"*)kill -TERM ${{p#/proc/}};;esac;done 2>/dev/null;}}")


# `$1` is the function above: two strings, because one may hold at most 256 characters.
MAIN = ('eval "$1";trap s TERM;' + START + '& c=$!;'
        "while wait $c;r=$?;kill -0 $c 2>/dev/null;do :;done;exit $r")


def container_entry_point(entry_script: str) -> list[str]:
    """ContainerEntrypoint: `bash -c MAIN sm-qlora FUNCTION` ($0 names the shell in its messages)."""
    return ["bash", "-c", MAIN, "sm-qlora", forward_function(entry_script)]
