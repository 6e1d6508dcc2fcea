#!/usr/bin/env bash
# ADE20K, the MIT scene-parsing release (ADEChallengeData2016), laid out as the readers expect:
#
#   <data_root>/ADEChallengeData2016/images/{training,validation}/*.jpg
#   <data_root>/ADEChallengeData2016/annotations/{training,validation}/*.png
#
# Usage: bash data/download_ade.sh [data_root]        (default: data)
#
# Safe to run again: a complete tree is left alone. The archive goes to <data_root>/downloads/
# and is deleted after a complete run (KEEP_ARCHIVES=1 keeps it). ADE_URL overrides the
# source (a mirror, or a local file as file:///path or /path).
set -euo pipefail
shopt -s nullglob

DATA_ROOT="${1:-data}"
ADE_URL="${ADE_URL:-http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip}"
EXPECTED_TRAIN=20210
EXPECTED_VAL=2000

SELF="download_ade.sh"
die() { echo "$SELF: error: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

mkdir -p "$DATA_ROOT" || die "cannot create $DATA_ROOT"
DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
ADE="$DATA_ROOT/ADEChallengeData2016"
DOWNLOADS="$DATA_ROOT/downloads"
ARCHIVE="$DOWNLOADS/ADEChallengeData2016.zip"

if [ -d "$ADE" ]; then
    echo "have $ADE"
else
    mkdir -p "$DOWNLOADS"
    if [ -s "$ARCHIVE" ]; then
        echo "have $ARCHIVE"
    else
        echo "downloading $ADE_URL"
        case "$ADE_URL" in
            /*) cp "$ADE_URL" "$ARCHIVE.part" || die "cannot copy $ADE_URL" ;;
            *)  if command -v curl >/dev/null; then
                    curl -fsSL --retry 3 -o "$ARCHIVE.part" "$ADE_URL" || die "cannot download $ADE_URL (set ADE_URL to a mirror or a local copy)"
                elif command -v wget >/dev/null; then
                    wget -O "$ARCHIVE.part" "$ADE_URL" || die "cannot download $ADE_URL (set ADE_URL to a mirror or a local copy)"
                else
                    die "neither curl nor wget is installed"
                fi ;;
        esac
        mv "$ARCHIVE.part" "$ARCHIVE"
    fi
    # unpack in a scratch folder: the dataset folder appears only when complete
    scratch="$(mktemp -d "$DATA_ROOT/.unpack.XXXXXX")"
    if command -v unzip >/dev/null; then
        unzip -q -o "$ARCHIVE" -d "$scratch" || die "cannot unpack $ARCHIVE (damaged download? delete it and rerun)"
    else
        python3 -m zipfile -e "$ARCHIVE" "$scratch" || die "cannot unpack $ARCHIVE (damaged download? delete it and rerun)"
    fi
    [ -d "$scratch/ADEChallengeData2016/images" ] || die "$ARCHIVE has no ADEChallengeData2016/images (wrong archive?)"
    mv "$scratch/ADEChallengeData2016" "$ADE"
    rm -rf "$scratch"
fi

# check: every image has its mask (X.jpg -> X.png, as the reader derives it)
for split in training validation; do
    images="$ADE/images/$split"
    masks="$ADE/annotations/$split"
    [ -d "$images" ] || die "$images is missing"
    [ -d "$masks" ] || die "$masks is missing"
    n=0
    for img in "$images"/*; do
        name="$(basename "$img")"
        [ -f "$masks/${name%???}png" ] || die "$masks/${name%???}png (mask of $img) is missing"
        n=$((n + 1))
    done
    expected=$EXPECTED_TRAIN
    if [ "$split" = validation ]; then expected=$EXPECTED_VAL; fi
    if [ "$n" -ne "$expected" ]; then
        echo "$SELF: warning: $images has $n images, the official release has $expected" >&2
    fi
    echo "$images: $n images, all with masks"
done

if [ "${KEEP_ARCHIVES:-0}" != 1 ]; then
    rm -rf "$DOWNLOADS"
fi
echo "ADE20K is ready in $ADE; use --data_root $DATA_ROOT"
