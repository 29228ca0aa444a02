#!/usr/bin/env bash
# Run a torchrun command on several Slurm nodes.
#
# Usage: ./script/srun_multi_node.sh <num_nodes> <gpus_per_node> <command after torchrun>...
# e.g.   ./script/srun_multi_node.sh 2 2 test/single_req_test.py models=X models.ckpt_dir=/p infer.tp_size=2
#
# Outside a Slurm step it re-runs itself under
#   srun --nodes N --ntasks-per-node 1 --gres=gpu:G --cpus-per-task 24*G
# Inside the step, node R runs torchrun --nnodes N --nproc_per_node G --node_rank $SLURM_NODEID --master_addr
# <first node> --master_port P ..., P = $MASTER_PORT or 52000 + SLURM_JOB_ID % 10000, with
# NCCL_GRAPH_MIXING_SUPPORT=0 NCCL_GRAPH_REGISTER=0. CHITU_DRY_RUN=1 only prints the commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=multi_node_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/multi_node_common.sh"
USAGE="usage: $0 <num_nodes> <gpus_per_node> <command after torchrun>..."

(($# >= 2)) || mn_usage_error "too few arguments"
mn_check_count num_nodes "$1"
mn_check_count gpus_per_node "$2"
nodes=$1
gpus=$2
shift 2
mn_check_command "$@"
nccl_env=(NCCL_GRAPH_MIXING_SUPPORT=0 NCCL_GRAPH_REGISTER=0)

# Fills HOSTS with the step's (else the job's) node names, if Slurm gave any.
slurm_hosts() {
    local list=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
    HOSTS=()
    [[ -n $list ]] || return 0
    if command -v scontrol >/dev/null; then
        mapfile -t HOSTS < <(scontrol show hostnames "$list")
    else
        IFS=',' read -r -a HOSTS <<<"$list"
    fi
}

slurm_port() {
    if [[ -n ${MASTER_PORT:-} ]]; then
        mn_check_count MASTER_PORT "$MASTER_PORT"
        echo "$MASTER_PORT"
    elif [[ -n ${SLURM_JOB_ID:-} ]]; then
        echo $((MN_DEFAULT_PORT + SLURM_JOB_ID % 10000))
    else
        echo "<$MN_DEFAULT_PORT+SLURM_JOB_ID%10000>"
    fi
}

if [[ -z ${SLURM_PROCID:-} ]]; then
    self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    srun_cmd=(srun --nodes "$nodes" --ntasks-per-node 1 "--gres=gpu:$gpus" --cpus-per-task $((24 * gpus))
        "$self" "$nodes" "$gpus" "$@")
    if ! mn_dry_run; then
        exec "${srun_cmd[@]}"
    fi
    mn_quote "${srun_cmd[@]}"
    # What each node would run; names and port are placeholders where Slurm has not decided them yet.
    slurm_hosts
    port=$(slurm_port)
    for ((r = 0; r < nodes; r++)); do
        [[ -n ${HOSTS[r]:-} ]] || HOSTS[r]="<node$r>"
    done
    for ((r = 0; r < nodes; r++)); do
        mn_torchrun "$nodes" "$gpus" "$r" "${HOSTS[0]}" "$port" "$@"
        line=$(mn_quote env "${nccl_env[@]}" "${TORCHRUN[@]}")
        for placeholder in "${HOSTS[0]}" "$port"; do
            [[ $placeholder == \<*\> ]] && line=${line//"$(printf %q "$placeholder")"/$placeholder}
        done
        echo "node $r (${HOSTS[r]}): $line"
    done
    exit 0
fi

slurm_hosts
((${#HOSTS[@]} > 0)) || { echo "error: SLURM_JOB_NODELIST is not set" >&2; exit 1; }
rank=${SLURM_NODEID:?SLURM_NODEID is not set}
mn_torchrun "$nodes" "$gpus" "$rank" "${HOSTS[0]}" "$(slurm_port)" "$@"
if mn_dry_run; then
    echo "node $rank (${HOSTS[rank]:-$(hostname)}): $(mn_quote env "${nccl_env[@]}" "${TORCHRUN[@]}")"
    exit 0
fi
export "${nccl_env[@]}"
exec "${TORCHRUN[@]}"
