#!/bin/bash
# make-tarball.sh - build psprobe-<version>.tar.gz, the Source0 of psprobe.spec.
#
# Usage:  packaging/make-tarball.sh [--worktree | --allow-dirty] [OUTDIR]
#
#   (default)   `git archive HEAD`: exactly the committed tree. Release builds use this.
#               It REFUSES when a tracked file differs from HEAD (staged or not): such a
#               change (a bumped Release: in psprobe.spec, say) would silently not be built.
#               It warns about untracked files, which are not packed either.
#   --allow-dirty  HEAD anyway, with a warning naming what is left out.
#   --worktree  the working tree as it is on disk: tracked files plus untracked files that
#               .gitignore does not exclude (git ls-files -co --exclude-standard), less
#               earlier tarballs (psprobe-*.tar.gz) left at the top. The RPM tests use it so
#               they package what is being tested, committed or not.
#   OUTDIR      where to write the tarball (default: the current directory).
#
# The version is read from psprobe/__init__.py (its only home); the script refuses to run
# when psprobe.spec's Version: disagrees, so a tarball never carries a mismatched spec.
# Every file sits under psprobe-<version>/ in the tarball, as %setup expects.
# Prints the absolute path of the tarball on stdout.
#
# Build the RPM from it:
#   tarball=$(packaging/make-tarball.sh)
#   rpmbuild -ta "$tarball"                      # on EL8/EL9 (rpmbuild reads the spec inside)
#   rpmbuild -ba --define "_sourcedir $(dirname "$tarball")" psprobe.spec
set -eu

mode=head
allow_dirty=
case ${1:-} in
    --worktree) mode=worktree; shift ;;
    --allow-dirty) allow_dirty=1; shift ;;
esac
outdir=${1:-.}

top=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
version=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$top/psprobe/__init__.py")
if [ -z "$version" ]; then
    echo "make-tarball: no __version__ = \"...\" line in psprobe/__init__.py" >&2
    exit 1
fi
spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$top/psprobe.spec")
if [ "$spec_version" != "$version" ]; then
    echo "make-tarball: psprobe.spec Version: $spec_version but psprobe/__init__.py says $version" >&2
    exit 1
fi

mkdir -p "$outdir"
out=$(cd "$outdir" && pwd)/psprobe-$version.tar.gz
prefix=psprobe-$version/

if [ "$mode" = head ]; then
    dirty=$(git -C "$top" status --porcelain --untracked-files=no)
    untracked=$(git -C "$top" ls-files -o --exclude-standard | grep -v '^psprobe-[^/]*\.tar\.gz$' || :)
    if [ -n "$dirty" ]; then
        {
            echo "make-tarball: UNCOMMITTED CHANGES to files it packs; they would NOT be in the tarball"
            echo "(git archive HEAD packs the committed tree):"
            printf '%s\n' "$dirty" | sed 's/^/    /'
        } >&2
        if [ -z "$allow_dirty" ]; then
            echo "make-tarball: refusing. Commit them, or package the work tree as it is (--worktree)," \
                 "or HEAD without them (--allow-dirty)." >&2
            exit 1
        fi
        echo "make-tarball: WARNING: packaging HEAD without those changes (--allow-dirty)" >&2
    fi
    if [ -n "$untracked" ]; then
        echo "make-tarball: warning: untracked files are not in the tarball:" >&2
        printf '%s\n' "$untracked" | sed 's/^/    /' >&2
    fi
    git -C "$top" archive --format=tar.gz --prefix="$prefix" -o "$out" HEAD
else
    # Deleted-but-tracked files are still listed by ls-files -c: keep only what exists.
    # Timestamps are pinned to the last commit so the same tree gives the same tarball.
    mtime=$(git -C "$top" log -1 --format=%ct 2>/dev/null || echo 0)
    (
        cd "$top"
        git ls-files -z -co --exclude-standard | sort -z -u |
            while IFS= read -r -d '' f; do
                case $f in psprobe-*.tar.gz) [[ $f == */* ]] || continue ;; esac
                [ -e "$f" ] && printf '%s\0' "$f"
            done |
            tar --null --no-recursion --transform "s,^,$prefix," \
                --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
                -czf "$out" -T -
    )
fi
echo "$out"
