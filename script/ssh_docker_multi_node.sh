#!/usr/bin/env bash
# Run a torchrun command in a docker container of the same name on several hosts, over passwordless ssh.
#
# Usage: ./script/ssh_docker_multi_node.sh <container> <pwd-in-container> "host1,host2,..." <gpus_per_node> \
#            <command after torchrun>...
# e.g.   ./script/ssh_docker_multi_node.sh my_container /workspace "host1,host2" 2 test/single_req_test.py models=X
#
# Host i runs: docker exec -t <container> bash --login -c "cd <pwd-in-container> && env ... torchrun --nnodes
# <#hosts> --nproc_per_node G --node_rank i --master_addr host1 --master_port $MASTER_PORT ..." with the set
# NCCL_*, GLOO_*, TP_SOCKET_*, CHITU_*, CUDA_VISIBLE_DEVICES variables forwarded (paths are the container's own).
# MASTER_PORT defaults to 52000. CHITU_DRY_RUN=1 only prints the commands. Exits with the first failing node's
# code; Ctrl-C stops the ssh jobs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=multi_node_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/multi_node_common.sh"
USAGE="usage: $0 <container> <pwd-in-container> \"host1,host2,...\" <gpus_per_node> <command after torchrun>..."

(($# >= 4)) || mn_usage_error "too few arguments"
container=$1
workdir=$2
[[ -n $container ]] || mn_usage_error "empty container name"
[[ -n $workdir ]] || mn_usage_error "empty pwd-in-container"
mn_hosts_gpus_port "${@:3}"
shift 4
mn_forward_env --no-paths

mn_remote_command() {
    local inner
    inner="cd $(printf %q "$workdir") && $(mn_env_torchrun)"
    echo "docker exec -t $(printf %q "$container") bash --login -c $(mn_squote "$inner")"
}

mn_ssh_launch "$GPUS" "$PORT" "$@"
