# shellcheck shell=bash
# Shared helpers of the castor lab scripts (sourced, not run).
#
# The lab is assembled from Debian packages fetched with `apt-get download`
# and unpacked with `dpkg-deb -x`: nothing is installed into the host. Images
# live in the cache directory (outside the work tree), one directory per set
# of package versions, so a rebuild happens only when a version (or one of
# the files in tools/lab/ that shape an image) changed.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_REPO=$(cd "$LAB_DIR/../.." && pwd)

lab_die() {
    echo "lab: error: $*" >&2
    exit 1
}

lab_log() {
    [[ -n ${LAB_QUIET:-} ]] || echo "lab: $*" >&2
}

# The cache: $CASTOR_LAB_CACHE, else /var/cache/castor-lab when writable,
# else $XDG_CACHE_HOME/castor-lab (~/.cache/castor-lab).
lab_cache_dir() {
    local dir=${CASTOR_LAB_CACHE:-}
    if [[ -z $dir ]]; then
        if mkdir -p /var/cache/castor-lab 2>/dev/null && [[ -w /var/cache/castor-lab ]]; then
            dir=/var/cache/castor-lab
        else
            dir=${XDG_CACHE_HOME:-$HOME/.cache}/castor-lab
        fi
    fi
    mkdir -p "$dir/debs" "$dir/images" || lab_die "cannot create the lab cache $dir"
    echo "$dir"
}

lab_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 ||
            lab_die "'$tool' is missing on this host (apt-get install ${LAB_TOOL_PKG[$tool]:-$tool})"
    done
}
declare -A LAB_TOOL_PKG=(
    [qemu-system-x86_64]=qemu-system-x86 [dpkg-deb]=dpkg [apt-get]=apt [cpio]=cpio
    [xz]=xz-utils [ldd]=libc-bin [gzip]=gzip
)

# Candidate version of a package in the host's apt sources, or a clear error.
lab_candidate() {
    local pkg=$1 v
    v=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    if [[ -z $v || $v == "(none)" ]]; then
        lab_die "package $pkg is not available from this host's apt sources" \
            "(run apt-get update; the kernel needs bookworm-backports or bookworm-security)"
    fi
    echo "$v"
}

# The newest Debian kernel image >= 6.7 (the sim domain needs PAGEMAP_SCAN)
# that apt can fetch, e.g. linux-image-6.12.117+deb12-amd64-unsigned;
# $CASTOR_LAB_KERNEL overrides the package name.
lab_kernel_pkg() {
    if [[ -n ${CASTOR_LAB_KERNEL:-} ]]; then
        echo "$CASTOR_LAB_KERNEL"
        return
    fi
    local name best=""
    while read -r name; do
        [[ $(apt-cache policy "$name" | awk '/Candidate:/ {print $2}') != "(none)" ]] || continue
        best=$name
    done < <(apt-cache pkgnames linux-image- |
        grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64-unsigned$' |
        sort -V | awk -F'[-.+]' '$3 > 6 || ($3 == 6 && $4 >= 7)')
    [[ -n $best ]] || lab_die "no linux-image-X.Y.Z+debNN-amd64-unsigned >= 6.7 in apt's sources" \
        "(add bookworm-backports or bookworm-security and run apt-get update)"
    echo "$best"
}

# Fetch a package's candidate .deb into the cache (once); prints its path.
lab_fetch() {
    local pkg=$1 cache ver file
    cache=$(lab_cache_dir)
    ver=$(lab_candidate "$pkg")
    file=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
        [[ $(dpkg-deb -f "$f" Version) == "$ver" ]] && echo "$f"
    done | head -n1)
    if [[ -z $file ]]; then
        lab_log "fetching $pkg $ver"
        (cd "$cache/debs" && apt-get download -q=2 "$pkg=$ver" >/dev/null 2>&1) ||
            lab_die "apt-get download $pkg=$ver failed (network? apt-get update?)"
        file=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
            [[ $(dpkg-deb -f "$f" Version) == "$ver" ]] && echo "$f"
        done | head -n1)
        [[ -n $file ]] || lab_die "apt-get download $pkg=$ver left no .deb in $cache/debs"
    fi
    echo "$file"
}

# Copy a binary's shared libraries, as the host's loader resolves them (with
# $LD_LIBRARY_PATH pointing into the root first), into root $1 at the same
# paths. Libraries already inside the root stay where they are.
lab_copy_libs() {
    local root=$1 bin=$2 line lib
    while read -r line; do
        case $line in
        *"not found"*) lab_die "$bin needs ${line%% *}, which is neither in the lab's packages nor on this host" ;;
        *"=> /"*) lib=${line#*=> } && lib=${lib%% (*} ;;
        /*) lib=${line%% (*} ;;
        *) continue ;;
        esac
        case $lib in
        "$root"/*) ;;
        *) [[ -e $root$lib ]] || { mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; } ;;
        esac
    done < <(ldd "$bin" 2>/dev/null || true)
}
