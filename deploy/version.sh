#!/bin/sh
# Prints this tree's version as a Debian package takes it: from the newest
# tag vX.Y.Z, "X.Y.Z" at the tag and "X.Y.Z+N.gHASH" N commits after it;
# without a tag, "0.0.0+N.gHASH" (N commits in all). ".dirty" marks
# uncommitted changes.
set -e
cd "$(dirname "$0")/.."
dirty=""
if ! git diff --quiet HEAD -- 2>/dev/null; then
	dirty=".dirty"
fi
if d=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
	# v1.2.3 or v1.2.3-4-gabcdef
	echo "$d" | sed -E 's/^v//; s/-([0-9]+)-g([0-9a-f]+)$/+\1.g\2/' | sed "s/\$/$dirty/"
else
	echo "0.0.0+$(git rev-list --count HEAD).g$(git rev-parse --short=12 HEAD)$dirty"
fi
