#!/usr/bin/env bash
# Pascal VOC 2012 + the SBD-augmented masks (DeepLab "SegmentationClassAug"), laid out as the
# readers expect:
#
#   <data_root>/PascalVOC12/JPEGImages/*.jpg
#   <data_root>/PascalVOC12/SegmentationClassAug/*.png
#   <data_root>/PascalVOC12/SegmentationClassAug_Visualization/   (not read by the code)
#   <data_root>/PascalVOC12/splits/train_aug.txt, val.txt, ...    (the DeepLab "list" folder)
#
# Optional, for the methods that read saliency maps (SSUL; see data/README.md):
#
#   <data_root>/PascalVOC12/saliency_map/<id>.png           (8-bit grey, any value > 0 salient)
#
# Usage: bash data/download_voc.sh [data_root]        (default: data)
#        WITH_SALIENCY=1 SALIENCY_URL=... bash data/download_voc.sh [data_root]
#
# The saliency step runs when WITH_SALIENCY=1 or SALIENCY_URL is set. No address is built in:
# SALIENCY_URL names the archive of the maps (a .zip, .tar or .tar.gz; a URL or a local
# file), holding a saliency_map/ folder or the PNG files themselves. Without it the step
# stops at once, saying where to get the maps and where to put them.
#
# Safe to run again: finished parts are kept, missing ones are fetched. Archives go to
# <data_root>/downloads/ and are deleted after a complete run (KEEP_ARCHIVES=1 keeps them).
# Sources can be overridden (a mirror, or a local file as file:///path or /path):
#   VOC_URL, VOC_AUG_URL, VOC_AUG_VIS_URL, VOC_LIST_URL; SKIP_VISUALIZATION=1 skips the
#   visualisation masks.
set -euo pipefail
shopt -s nullglob

DATA_ROOT="${1:-data}"
VOC_URL="${VOC_URL:-http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar}"
VOC_AUG_URL="${VOC_AUG_URL:-http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip}"
VOC_AUG_VIS_URL="${VOC_AUG_VIS_URL:-http://cs.jhu.edu/~cxliu/data/SegmentationClassAug_Visualization.zip}"
VOC_LIST_URL="${VOC_LIST_URL:-http://cs.jhu.edu/~cxliu/data/list.zip}"
EXPECTED_TRAIN=10582
EXPECTED_VAL=1449

SELF="download_voc.sh"
die() { echo "$SELF: error: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

mkdir -p "$DATA_ROOT" || die "cannot create $DATA_ROOT"
DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
VOC="$DATA_ROOT/PascalVOC12"
DOWNLOADS="$DATA_ROOT/downloads"

SALIENCY_URL="${SALIENCY_URL:-}"
WITH_SALIENCY="${WITH_SALIENCY:-0}"
if [ -n "$SALIENCY_URL" ]; then WITH_SALIENCY=1; fi
# checked before anything is downloaded: the maps have no built-in address
if [ "$WITH_SALIENCY" = 1 ] && [ -z "$SALIENCY_URL" ] && [ ! -d "$VOC/saliency_map" ]; then
    die "WITH_SALIENCY=1 needs SALIENCY_URL: this script has no address for the saliency maps; get the archive of the maps SSUL uses (linked from the data preparation notes of github.com/clovaai/SSUL) and rerun with SALIENCY_URL=/path/to/the/archive, or unpack it yourself so that $VOC/saliency_map/<id>.png exists for every training image"
fi
mkdir -p "$DOWNLOADS"

# fetch URL FILE VARIABLE: download once (a complete file is never fetched again)
fetch() {
    local url="$1" out="$DOWNLOADS/$2" var="$3"
    if [ -s "$out" ]; then echo "have $out"; return; fi
    echo "downloading $url"
    case "$url" in
        /*) cp "$url" "$out.part" || die "cannot copy $url" ;;
        *)  if command -v curl >/dev/null; then
                curl -fsSL --retry 3 -o "$out.part" "$url" || die "cannot download $url (set $var to a mirror or a local copy)"
            elif command -v wget >/dev/null; then
                wget -O "$out.part" "$url" || die "cannot download $url (set $var to a mirror or a local copy)"
            else
                die "neither curl nor wget is installed"
            fi ;;
    esac
    mv "$out.part" "$out"
}

unpack() {  # unpack ARCHIVE DIR
    case "$1" in
        *.tar|*.tar.gz|*.tgz) tar -xf "$1" -C "$2" || die "cannot unpack $1 (damaged download? delete it and rerun)" ;;
        *.zip) if command -v unzip >/dev/null; then
                   unzip -q -o "$1" -d "$2" || die "cannot unpack $1 (damaged download? delete it and rerun)"
               else
                   python3 -m zipfile -e "$1" "$2" || die "cannot unpack $1 (damaged download? delete it and rerun)"
               fi ;;
    esac
}

# install_from VARIABLE ARCHIVE_NAME SOURCE_IN_ARCHIVE TARGET: fetch the archive at the URL
# held by VARIABLE, unpack it in a scratch folder and move SOURCE to TARGET, so that TARGET
# appears only when complete
install_from() {
    local var="$1" name="$2" source="$3" target="$4"
    if [ -e "$target" ]; then echo "have $target"; return; fi
    fetch "${!var}" "$name" "$var"
    local scratch
    scratch="$(mktemp -d "$DATA_ROOT/.unpack.XXXXXX")"
    unpack "$DOWNLOADS/$name" "$scratch"
    [ -e "$scratch/$source" ] || die "$name does not contain $source (wrong archive?)"
    mv "$scratch/$source" "$target"
    rm -rf "$scratch"
}

# 1. VOC 2012 trainval: the content of VOCdevkit/VOC2012 becomes PascalVOC12/
if [ ! -d "$VOC/JPEGImages" ]; then
    fetch "$VOC_URL" VOCtrainval_11-May-2012.tar VOC_URL
    scratch="$(mktemp -d "$DATA_ROOT/.unpack.XXXXXX")"
    unpack "$DOWNLOADS/VOCtrainval_11-May-2012.tar" "$scratch"
    [ -d "$scratch/VOCdevkit/VOC2012/JPEGImages" ] || die "the VOC archive has no VOCdevkit/VOC2012/JPEGImages"
    mkdir -p "$VOC"
    for entry in "$scratch/VOCdevkit/VOC2012/"*; do
        [ -e "$VOC/$(basename "$entry")" ] || mv "$entry" "$VOC/"
    done
    rm -rf "$scratch"
else
    echo "have $VOC/JPEGImages"
fi

# 2. augmented masks, their visualisation, and the split lists (list/ renamed to splits/)
install_from VOC_AUG_URL SegmentationClassAug.zip SegmentationClassAug "$VOC/SegmentationClassAug"
if [ "${SKIP_VISUALIZATION:-0}" != 1 ]; then
    install_from VOC_AUG_VIS_URL SegmentationClassAug_Visualization.zip \
        SegmentationClassAug_Visualization "$VOC/SegmentationClassAug_Visualization"
fi
install_from VOC_LIST_URL list.zip list "$VOC/splits"

# 3. check: every file named by the two lists exists
check_list() {
    local list="$VOC/splits/$1" expected="$2" n=0 img mask
    [ -f "$list" ] || die "$list is missing"
    while read -r img mask; do
        [ -f "$VOC$img" ] || die "$VOC$img (listed in $list) is missing"
        [ -f "$VOC$mask" ] || die "$VOC$mask (listed in $list) is missing"
        n=$((n + 1))
    done < "$list"
    if [ "$n" -ne "$expected" ]; then
        echo "$SELF: warning: $list has $n entries, the official list has $expected" >&2
    fi
    echo "$list: $n image/mask pairs, all present"
}
check_list train_aug.txt "$EXPECTED_TRAIN"
check_list val.txt "$EXPECTED_VAL"

# 4. optional: the saliency maps, one per training image
if [ "$WITH_SALIENCY" = 1 ]; then
    SALIENCY="$VOC/saliency_map"
    if [ ! -d "$SALIENCY" ]; then
        case "$SALIENCY_URL" in
            *.zip) archive=saliency_map.zip ;;
            *.tar) archive=saliency_map.tar ;;
            *.tar.gz|*.tgz) archive=saliency_map.tar.gz ;;
            *) die "SALIENCY_URL must name a .zip, .tar or .tar.gz archive, got $SALIENCY_URL (download it by hand and give its path)" ;;
        esac
        fetch "$SALIENCY_URL" "$archive" SALIENCY_URL
        scratch="$(mktemp -d "$DATA_ROOT/.unpack.XXXXXX")"
        unpack "$DOWNLOADS/$archive" "$scratch"
        found="$(find "$scratch" -maxdepth 3 -type d -name saliency_map -not -path '*/__MACOSX/*' | head -n 1)"
        if [ -z "$found" ]; then
            pngs=("$scratch"/*.png)
            [ "${#pngs[@]}" -gt 0 ] || die "$archive holds no saliency_map folder and no PNG files at its top (wrong archive?)"
            found="$scratch"
        fi
        mv "$found" "$SALIENCY"     # appears only when complete
        chmod 755 "$SALIENCY"
        rm -rf "$scratch"
    else
        echo "have $SALIENCY"
    fi
    n=0; missing=0; first=""
    while read -r img _; do
        id="${img##*/}"; id="${id%.jpg}"
        if [ ! -f "$SALIENCY/$id.png" ]; then
            missing=$((missing + 1)); [ -n "$first" ] || first="$SALIENCY/$id.png"
        fi
        n=$((n + 1))
    done < "$VOC/splits/train_aug.txt"
    [ "$missing" -eq 0 ] || die "$missing of $n training images have no saliency map, e.g. $first is missing (wrong or incomplete archive? delete $SALIENCY and rerun with another SALIENCY_URL)"
    echo "$SALIENCY: a saliency map for each of the $n training images"
fi

if [ "${KEEP_ARCHIVES:-0}" != 1 ]; then
    rm -rf "$DOWNLOADS"
fi
echo "Pascal VOC 2012 (+SBD) is ready in $VOC; use --data_root $DATA_ROOT"
