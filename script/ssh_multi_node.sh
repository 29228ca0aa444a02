#!/usr/bin/env bash
# Run a torchrun command on several hosts over passwordless ssh.
#
# Usage: ./script/ssh_multi_node.sh "host1,host2,..." <gpus_per_node> <command after torchrun>...
# e.g.   ./script/ssh_multi_node.sh "host1,host2" 2 test/single_req_test.py models=X models.ckpt_dir=/p infer.tp_size=2
#
# Host i runs, from the current directory:
#   torchrun --nnodes <#hosts> --nproc_per_node G --node_rank i --master_addr host1 --master_port $MASTER_PORT ...
# with PATH, LD_LIBRARY_PATH, VIRTUAL_ENV, PYTHONPATH and the set NCCL_*, GLOO_*, TP_SOCKET_*, CHITU_*,
# CUDA_VISIBLE_DEVICES variables forwarded. MASTER_PORT defaults to 52000. CHITU_DRY_RUN=1 only prints the
# commands. Exits with the first failing node's code; Ctrl-C stops the ssh jobs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=multi_node_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/multi_node_common.sh"
USAGE="usage: $0 \"host1,host2,...\" <gpus_per_node> <command after torchrun>..."

(($# >= 2)) || mn_usage_error "too few arguments"
mn_hosts_gpus_port "$@"
shift 2
mn_forward_env

mn_remote_command() {
    echo "cd $(printf %q "$PWD") && $(mn_env_torchrun)"
}

mn_ssh_launch "$GPUS" "$PORT" "$@"
