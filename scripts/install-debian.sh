#!/usr/bin/env bash
# Debian side of the install: the tools the source library runs (fluidsynth, espeak-ng) and the
# sound packages it reads, downloaded as .deb files into a cache (nothing of them is installed).
# Idempotent: installs and downloads only what is missing.
set -euo pipefail
deb_cache=${1:?usage: install-debian.sh DEB_CACHE_DIR}
tools=(fluidsynth espeak-ng)
packages=(scratch tuxpaint-stamps-default minetest-data qabcs-data sound-theme-freedesktop sound-icons
          redeclipse-data supertux-data bucklespring-data extremetuxracer-data freeciv-data
          gcompris-qt-data sonic-pi-samples simutrans-pak64 minetest-mod-homedecor hedgewars-data
          frozen-bubble-data openttd-opensfx openclonk-data hydrogen-drumkits scorched3d-data
          lmms-common supertuxkart-data torcs-data fillets-ng-data flare-game lugaru-data
          colobot-common-sounds boswars-data foobillardplus-data tuxfootball 7kaa-data ufoai-sound
          nexuiz-data flightgear-data-base warzone2100-data ardentryst openarena-data
          minetest-mod-mesecons tuxtype-data lomiri-sounds tuxmath-data granatier minetest-mod-xdecor
          fluid-soundfont-gm)

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

missing_tools=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || missing_tools+=("$tool")
done
missing_debs=()
mkdir -p "$deb_cache"
for package in "${packages[@]}"; do
  compgen -G "$deb_cache/${package}_*.deb" >/dev/null || missing_debs+=("$package")
done
if [ ${#missing_tools[@]} -eq 0 ] && [ ${#missing_debs[@]} -eq 0 ]; then
  echo "debian: tools and packages already present"
  exit 0
fi

# apt-get download needs package lists; refresh them once if they are missing or stale.
if ! apt-cache show "${packages[0]}" >/dev/null 2>&1; then
  $sudo apt-get update -qq
fi
if [ ${#missing_tools[@]} -gt 0 ]; then
  echo "debian: installing ${missing_tools[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_tools[@]}"
fi
if [ ${#missing_debs[@]} -gt 0 ]; then
  echo "debian: downloading ${missing_debs[*]} into $deb_cache"
  staging=$(mktemp -d "$deb_cache/.download.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  # As root, apt warns that its sandbox user cannot write here; the download still succeeds.
  (cd "$staging" && apt-get download "${missing_debs[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  for package in "${missing_debs[@]}"; do
    compgen -G "$staging/${package}_*.deb" >/dev/null || { echo "debian: download of $package failed" >&2; exit 1; }
  done
  mv "$staging"/*.deb "$deb_cache/"
fi
