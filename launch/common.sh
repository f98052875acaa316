# Shared helpers of the launch scripts (sourced, not run).

DRY_RUN="${DRY_RUN:-0}"

# Prints an argument so that the printed line can be pasted back into a shell (single quotes if needed).
quote() {
  local arg=$1
  if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_./=:,@%+^-]+$ ]]; then
    printf '%s' "$arg"
  elif [[ "$arg" =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# Echoes the command as `+ cmd args...` (one line, shell-quoted).
show() {
  local first=1 arg
  printf '+ '
  for arg in "$@"; do
    if (( first )); then first=0; else printf ' '; fi
    quote "$arg"
  done
  printf '\n'
}

# Echoes the command, then runs it unless this is a dry run.
run() {
  show "$@"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Joins arguments into one shell-quoted string (a remote `--command=`).
join_quoted() {
  local first=1 arg
  for arg in "$@"; do
    if (( first )); then first=0; else printf ' '; fi
    quote "$arg"
  done
}

# Notes printed between the commands (start with '#', so the dry-run output stays a valid script).
note() {
  printf '# %s\n' "$*"
}

# Fails with a message naming the variable when it is unset or empty.
require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      printf '%s: set %s (see launch/README.md)\n' "$(basename "$0")" "$name" >&2
      exit 2
    fi
  done
}

# protoseg_jax.main's exit code after SIGTERM / SIGINT once a checkpoint is saved (errors.EXIT_PREEMPTED):
# the run resumes where it stopped when the same command is run again.
EXIT_PREEMPTED=75
MAX_RESUMES="${MAX_RESUMES:-3}"

# Runs the command, and again while it exits with EXIT_PREEMPTED (at most MAX_RESUMES more times); Ctrl-C in
# this terminal ends the loop after the current run has saved. Returns the last exit code.
run_resuming() {
  show "$@"
  note "rerun while it exits $EXIT_PREEMPTED (preempted after saving a checkpoint)," \
    "at most $MAX_RESUMES times"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  local attempt=0 rc interrupted=0
  trap 'interrupted=1' INT
  while :; do
    set +e
    "$@"
    rc=$?
    set -e
    if (( rc != EXIT_PREEMPTED || interrupted || attempt >= MAX_RESUMES )); then
      trap - INT
      return "$rc"
    fi
    attempt=$((attempt + 1))
    note "exit $rc: resuming (attempt $attempt of $MAX_RESUMES)"
  done
}

# The remote-shell form of run_resuming: a one-line loop around an already quoted command.
resuming_loop() {
  local loop='n=0; while :; do %s; rc=$?; if [ "$rc" -ne %s ] || [ "$n" -ge %s ]; then exit "$rc"; fi;'
  loop+=' n=$((n + 1)); done'
  # shellcheck disable=SC2059
  printf "$loop" "$1" "$EXIT_PREEMPTED" "$MAX_RESUMES"
}
