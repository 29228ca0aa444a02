# shellcheck shell=bash disable=SC2034  # sets variables (HOSTS, TORCHRUN, ...) for the launchers
# Shared helpers for script/{srun,ssh,ssh_docker}_multi_node.sh. Sourced, not run.
#
# Every launcher runs, on node R of N:
#   torchrun --nnodes N --nproc_per_node G --node_rank R --master_addr <first host> --master_port <port> <cmd...>
# (static rendezvous: node R's processes get global ranks R*G .. R*G+G-1, so TP groups stay inside a node).
# CHITU_DRY_RUN=1 prints the commands ("node <R> (<host>): ...") instead of running them.
# The caller sets USAGE before calling mn_usage_error.

MN_DEFAULT_PORT=52000

mn_usage_error() {
    printf 'error: %s\n%s\n' "$1" "$USAGE" >&2
    exit 2
}

mn_dry_run() { [[ ${CHITU_DRY_RUN:-} == 1 ]]; }

# mn_check_count <what> <value>: a positive integer, or a usage error.
mn_check_count() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || mn_usage_error "$1 must be a positive integer, got '$2'"
}

# mn_check_command <args...>: the command after torchrun must be there.
mn_check_command() {
    (($# > 0)) && [[ -n $1 ]] || mn_usage_error "missing the command to run after torchrun"
}

# mn_parse_hosts "h1,h2,...": fills the array HOSTS (blanks and empty items dropped).
mn_parse_hosts() {
    local h parts
    HOSTS=()
    IFS=',' read -r -a parts <<<"$1"
    for h in "${parts[@]}"; do
        h=${h//[[:space:]]/}
        [[ -n $h ]] && HOSTS+=("$h")
    done
    ((${#HOSTS[@]} > 0)) || mn_usage_error "empty host list '$1'"
}

# mn_hosts_gpus_port "h1,h2,..." <gpus_per_node> <cmd...>: fills HOSTS, GPUS and PORT (MASTER_PORT or the
# default), checking each and that a command follows.
mn_hosts_gpus_port() {
    mn_parse_hosts "$1"
    mn_check_count gpus_per_node "$2"
    GPUS=$2
    mn_check_command "${@:3}"
    PORT=${MASTER_PORT:-$MN_DEFAULT_PORT}
    mn_check_count MASTER_PORT "$PORT"
}

# mn_quote <args...>: the arguments as one shell-safe string.
mn_quote() {
    local s
    s=$(printf '%q ' "$@")
    printf '%s\n' "${s% }"
}

# mn_squote <string>: the string in single quotes (more readable than %q for a whole command line).
mn_squote() {
    printf "'%s'\n" "${1//\'/\'\\\'\'}"
}

# mn_torchrun <nnodes> <gpus_per_node> <node_rank> <master_addr> <master_port> <cmd...>: fills the array TORCHRUN.
mn_torchrun() {
    TORCHRUN=(torchrun --nnodes "$1" --nproc_per_node "$2" --node_rank "$3"
        --master_addr "$4" --master_port "$5" "${@:6}")
}

# mn_forward_env [--no-paths]: fills the array FORWARD_ENV with NAME=value for the set variables that the
# remote side needs. --no-paths leaves out PATH, LD_LIBRARY_PATH, VIRTUAL_ENV and PYTHONPATH (for containers,
# whose paths are their own).
mn_forward_env() {
    local name
    FORWARD_ENV=()
    for name in $(compgen -e | sort); do
        case $name in
        CHITU_DRY_RUN) ;;
        PATH | LD_LIBRARY_PATH | VIRTUAL_ENV | PYTHONPATH)
            [[ ${1:-} == --no-paths ]] || FORWARD_ENV+=("$name=${!name}") ;;
        NCCL_* | GLOO_* | TP_SOCKET_* | CHITU_* | CUDA_VISIBLE_DEVICES) FORWARD_ENV+=("$name=${!name}") ;;
        esac
    done
}

# mn_env_torchrun: "env NAME=value ... torchrun ..." as one shell-safe string (FORWARD_ENV and TORCHRUN set).
mn_env_torchrun() {
    mn_quote env ${FORWARD_ENV[@]+"${FORWARD_ENV[@]}"} "${TORCHRUN[@]}"
}

# mn_ssh_launch <gpus_per_node> <port> <cmd...>: on every host of HOSTS, in the background,
# `ssh -n <host> "$(mn_remote_command)"`, where the caller's mn_remote_command turns TORCHRUN (filled for that
# node) into the remote shell string. Waits for all; exits with the first failing node's code.
mn_ssh_launch() {
    local gpus=$1 port=$2 i rc remote first_rc=0
    shift 2
    MN_PIDS=()
    # Background jobs of a script ignore SIGINT, so Ctrl-C has to be passed on by hand.
    trap 'mn_stop_nodes 130' INT
    trap 'mn_stop_nodes 143' TERM
    for i in "${!HOSTS[@]}"; do
        mn_torchrun "${#HOSTS[@]}" "$gpus" "$i" "${HOSTS[0]}" "$port" "$@"
        remote=$(mn_remote_command)
        if mn_dry_run; then
            echo "node $i (${HOSTS[i]}): ssh -n $(printf %q "${HOSTS[i]}") $(mn_squote "$remote")"
        else
            ssh -n "${HOSTS[i]}" "$remote" &
            MN_PIDS+=($!)
        fi
    done
    mn_dry_run && exit 0
    for i in "${!MN_PIDS[@]}"; do
        rc=0
        wait "${MN_PIDS[i]}" || rc=$?
        if ((rc != 0)); then
            echo "error: node $i (${HOSTS[i]}) failed with exit code $rc" >&2
            ((first_rc != 0)) || first_rc=$rc
        fi
    done
    exit "$first_rc"
}

mn_stop_nodes() {
    echo "interrupted: stopping the ssh jobs" >&2
    kill "${MN_PIDS[@]}" 2>/dev/null || true
    wait || true
    exit "$1"
}
