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
