#!/bin/sh
# `make deb`: the tree `make install DESTDIR=ROOT UNITDIR=/lib/systemd/system` staged, as a
# Debian package (docs/operations.md, "A Debian package"). dpkg then owns every file, keeps
# /etc/displback/displback.toml as a conffile (an admin's edits survive upgrades) and removes
# the rest with `apt remove`.
#
#   deb.sh ROOT OUTDIR       (run from the source tree's root; writes OUTDIR/displback_*.deb)
set -eu

root=$1
out=$2
[ -x "$root/opt/displback/bin/python" ] && [ -f "$root/lib/systemd/system/displback.service" ] ||
    { echo "deb.sh: $root is not staged with UNITDIR=/lib/systemd/system" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
arch=$(dpkg --print-architecture)
# The venv runs on the interpreter it was made with (numpy and pillow are built for it).
python=$(readlink -f "$root/opt/displback/bin/python3")
case $python in
/usr/bin/python3.*) ;;
*) echo "deb.sh: the venv must be made with Debian's /usr/bin/python3, not $python" >&2; exit 1 ;;
esac
pyver=${python#/usr/bin/python}

rm -rf "$root/DEBIAN"
mkdir -p "$root/DEBIAN" "$out"
cat > "$root/DEBIAN/control" <<EOF
Package: displback
Version: $version
Architecture: $arch
Maintainer: displback maintainers <root@localhost>
Depends: python$pyver, libatomic1
Section: admin
Priority: optional
Installed-Size: $(du -sk "$root" | cut -f1)
Description: para-virtual display backend for Xen Dom0 (vdispl)
 Shows the displays of guests running Linux's xen-drm-front on a DRM/KMS output of Dom0,
 or on a virtual display. A Python venv with its dependencies in /opt/displback.
EOF
echo /etc/displback/displback.toml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now displback.service || true
fi
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
EOF
chmod 0755 "$root/DEBIAN" "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"
# gzip: several times faster than xz on numpy's and pillow's libraries, for a few MB more.
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-gzip}" --build "$root" "$out/displback_${version}_$arch.deb"
