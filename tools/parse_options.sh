#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by run.sh / recipes: `--foo-bar VALUE` (or `--foo-bar=VALUE`) sets the shell
# variable foo_bar, which must already be defined (with its default) before this file is sourced.
# `--config FILE` sources FILE first. `--help`/`-h` prints $help_message and the current option values.
# Unknown options are an error; positional arguments are left in "$@".

_po_usage() {
  echo -e "${help_message:-}" >&2
}

while true; do
  [ -z "${1:-}" ] && break
  case "$1" in
    --help|-h)
      _po_usage
      exit 0 ;;
    --config)
      [ -f "${2:-}" ] || { echo "$0: --config: no such file '${2:-}'" >&2; exit 1; }
      # shellcheck disable=SC1090
      . "$2"; shift 2 ;;
    --*=*)
      _po_name=$(echo "${1%%=*}" | sed 's/^--//; s/-/_/g')
      _po_value=${1#*=}
      if ! declare -p "$_po_name" >/dev/null 2>&1; then
        echo "$0: invalid option ${1%%=*}" >&2; exit 1
      fi
      printf -v "$_po_name" '%s' "$_po_value"
      shift ;;
    --*)
      _po_name=$(echo "$1" | sed 's/^--//; s/-/_/g')
      if ! declare -p "$_po_name" >/dev/null 2>&1; then
        echo "$0: invalid option $1" >&2; exit 1
      fi
      [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
      printf -v "$_po_name" '%s' "$2"
      shift 2 ;;
    *) break ;;
  esac
done
unset _po_name _po_value
true
