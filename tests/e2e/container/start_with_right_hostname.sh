#!/usr/bin/env bash
# A stand-in for the Hugging Face training image's start script, written for the tests.
# The image's PID 1 is `bash -m start_with_right_hostname.sh train`. Its script reads
# current_host from /opt/ml/input/config/resourceconfig.json, compiles an LD_PRELOAD
# library that makes gethostname() return it, and runs `train` as a child (not exec):
# bash keeps PID 1, traps nothing, and `train` gets no signal sent to PID 1.
# Left out here: the hostname library (the tests resolve algo-1 through /etc/hosts).
if [[ "$1" = "train" ]]; then
     CURRENT_HOST=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["current_host"])' \
                    /opt/ml/input/config/resourceconfig.json)
     echo "current host: $CURRENT_HOST"
     train
else
     eval "$@"
fi
