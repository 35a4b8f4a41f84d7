#!/bin/sh
# Renders the ACL users (users.acl next to this script, or $REDIS_ACL_TEMPLATE) with their
# passwords and starts redis-server with them:
#
#   render-acl.sh [--render-only] OUT [redis-server options...]
#
# Each @NAME_SHA256@ in the template becomes the SHA-256 of the password in $NAME (or in the
# file named by $NAME_FILE: a Docker or Kubernetes secret); a password that is not given is an
# error, so a user is never left without one. Lines starting with '#' are comments (the ACL
# file format has none) and are dropped. The rendered file holds only hashes; it is written
# with mode 600. With --render-only it is written and nothing is started.
set -eu

render_only=
if [ "${1:-}" = "--render-only" ]; then render_only=1; shift; fi
out=${1:?usage: render-acl.sh [--render-only] OUT [redis-server options...]}
shift
template=${REDIS_ACL_TEMPLATE:-$(dirname "$0")/users.acl}

secret() {
    file=$(eval "printf %s \"\${${1}_FILE:-}\"")
    if [ -n "$file" ]; then
        value=$(cat "$file")
    else
        value=$(eval "printf %s \"\${${1}:-}\"")
    fi
    if [ -z "$value" ]; then
        echo "render-acl.sh: set $1 (or ${1}_FILE) to the password of its Redis user" >&2
        exit 64
    fi
    printf %s "$value" | sha256sum | cut -d ' ' -f 1
}

umask 077
script=""
for name in $(grep -o '@[A-Z0-9_]*_SHA256@' "$template" | sort -u | sed -e 's/^@//' -e 's/_SHA256@$//'); do
    script="$script -e s/@${name}_SHA256@/$(secret "$name")/g"
done
# shellcheck disable=SC2086  # $script is a list of sed expressions without spaces inside
grep -v -e '^#' -e '^[[:space:]]*$' "$template" | sed $script > "$out.tmp"
mv "$out.tmp" "$out"

[ -n "$render_only" ] && exit 0
exec redis-server "$@" --aclfile "$out"
