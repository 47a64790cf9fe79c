#!/bin/sh
# `make install` / `make uninstall` (docs/operations.md, "Install"): displback in a venv under
# /opt/displback (Debian 12's python3-trio, -structlog, -numpy and -pil are older than
# pyproject.toml needs), the command on the PATH, the unit, /etc/displback/displback.toml
# (an admin's edited file is never overwritten) and the documentation. Non-interactive; every
# path can be moved with the variables below, DESTDIR stages the whole tree elsewhere.
#
#   install.sh install|uninstall        (run from the source tree's root)
set -eu

DESTDIR=${DESTDIR-}
PREFIX=${PREFIX:-/usr}
BINDIR=${BINDIR:-$PREFIX/bin}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/displback}
VENVDIR=${VENVDIR:-/opt/displback}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
INSTALL_PYTHON=${INSTALL_PYTHON:-/usr/bin/python3}
# A directory of wheels (`make wheelhouse`): install without PyPI (air-gapped Dom0, tests).
WHEELHOUSE=${WHEELHOUSE-}
PIP_ARGS=${PIP_ARGS-}

CONFDIR=$SYSCONFDIR/displback
CONF=$CONFDIR/displback.toml
MARKER=.displback-install   # in the venv: what it was built from (and: it is ours)
SRC=$(pwd)

say() { printf 'displback: %s\n' "$*"; }
die() { printf 'displback: %s\n' "$*" >&2; exit 1; }

[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/displback" ] || die "run from the source tree's root"

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

# The Debian package (`make deb`) owns the same paths: dpkg, not this script, manages them.
refuse_if_packaged() {
    if [ -z "$DESTDIR" ] && command -v dpkg-query >/dev/null &&
        dpkg-query -S "$VENVDIR/bin/displback" >/dev/null 2>&1; then
        die "$VENVDIR belongs to the Debian package displback: use apt/dpkg (apt remove displback)"
    fi
}

# What the venv is built from: the package sources, pyproject.toml, setup.py (the optional C
# extension) and the interpreter. Not a .so an editable install built in the checkout.
source_id() {
    (cd "$SRC" && find pyproject.toml setup.py README.md displback -name __pycache__ -prune \
        -o -name '*.so' -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum &&
        readlink -f "$INSTALL_PYTHON") |
        sha256sum | cut -d' ' -f1
}

install_venv() {
    target=$DESTDIR$VENVDIR
    id=$(source_id)
    if [ -e "$target" ]; then
        [ -f "$target/$MARKER" ] || die "$target exists and was not made by this installer"
        if grep -qx "source $id" "$target/$MARKER"; then
            say "venv $target is up to date"
            return
        fi
    fi
    "$INSTALL_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$INSTALL_PYTHON is older than Python 3.11"
    # Built beside the target, then moved in place: a running daemon keeps its files until
    # it is restarted, and a failed build leaves the installed venv alone.
    stage=$target.new.$$
    src=$(mktemp -d)
    trap 'rm -rf "$stage" "$src"' EXIT
    mkdir -p "$(dirname "$target")"
    "$INSTALL_PYTHON" -m venv --prompt displback "$stage" ||
        die "cannot create a venv with $INSTALL_PYTHON (Debian: apt-get install python3-venv)"
    # Build from a copy, so that nothing (build/, *.egg-info) is written into the checkout.
    # setup.py builds displback.backend._copythreads when gcc and Python's headers are here
    # (python3-dev); without them pip installs the rest, and the daemon copies in Python
    # threads. A .so in the checkout (an editable install's) is not copied: it is rebuilt.
    (cd "$SRC" && tar -c --exclude=__pycache__ --exclude='*.so' pyproject.toml setup.py \
        README.md displback) | tar -x -C "$src"
    if [ -n "$WHEELHOUSE" ]; then
        set -- --no-index --find-links "$WHEELHOUSE"
    else
        set --
    fi
    # shellcheck disable=SC2086  # PIP_ARGS is a list of options
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore \
        "$stage/bin/python" -m pip install --quiet --no-compile "$@" $PIP_ARGS "$src" ||
        die "pip could not install displback and its dependencies (no network? see WHEELHOUSE)"
    # A venv names its own path in its scripts (shebangs, activate) and pyvenv.cfg: make them
    # name the final path, then compile everything (ensurepip's pip too: -f) with that path as
    # the source path in the .pyc files (tracebacks).
    grep -rlI --null -F "$stage" "$stage/bin" "$stage/pyvenv.cfg" |
        xargs -0 -r sed -i "s|$stage|$VENVDIR|g"
    "$stage/bin/python" -m compileall -q -f -j0 -s "$stage" -p "$VENVDIR" "$stage/lib" >/dev/null
    printf 'source %s\npython %s\n' "$id" "$(readlink -f "$INSTALL_PYTHON")" > "$stage/$MARKER"
    if [ -e "$target" ]; then
        mv "$target" "$target.old.$$"
        mv "$stage" "$target"
        rm -rf "$target.old.$$"
    else
        mv "$stage" "$target"
    fi
    rm -rf "$src"
    trap - EXIT
    say "venv $target: $("$target/bin/python" -m pip list --format=freeze 2>/dev/null |
        grep -iE '^(displback|trio|structlog|numpy|pillow)==' | tr '\n' ' ')"
}

install_command() {
    link=$DESTDIR$BINDIR/displback
    if [ -e "$link" ] || [ -L "$link" ]; then
        case $(readlink "$link" || true) in
        *"$VENVDIR/bin/displback") ;;
        *) die "$link exists and is not ours (a Debian package of displback?)" ;;
        esac
    fi
    mkdir -p "$DESTDIR$BINDIR"
    # Relative, so that the staged tree (DESTDIR) is consistent on its own.
    ln -sfr "$DESTDIR$VENVDIR/bin/displback" "$link"
}

install_unit() {
    mkdir -p "$DESTDIR$UNITDIR"
    sed -e "s|^ExecStart=/usr/bin/displback |ExecStart=$BINDIR/displback |" \
        -e "s|file:///usr/share/doc/displback/|file://$DOCDIR/|" \
        "$SRC/systemd/displback.service" > "$DESTDIR$UNITDIR/displback.service.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/displback.service.tmp"
    mv "$DESTDIR$UNITDIR/displback.service.tmp" "$DESTDIR$UNITDIR/displback.service"
}

install_config() {
    conf=$DESTDIR$CONF
    mkdir -p "$DESTDIR$CONFDIR"
    if [ ! -e "$conf" ]; then
        install -m 0644 "$SRC/config/displback.toml" "$conf"
        say "installed $CONF: edit it (display, connectors), then: systemctl enable --now displback"
    elif cmp -s "$SRC/config/displback.toml" "$conf"; then
        rm -f "$conf.dist"
    else
        install -m 0644 "$SRC/config/displback.toml" "$conf.dist"
        say "kept your edited $CONF; this version's example is $CONF.dist"
    fi
}

install_docs() {
    doc=$DESTDIR$DOCDIR
    rm -rf "$doc"
    mkdir -p "$doc/docs" "$doc/examples"
    install -m 0644 "$SRC/README.md" "$doc/"
    install -m 0644 "$SRC"/docs/*.md "$doc/docs/"
    # The unit's Documentation= names operations.md at the top.
    ln -s docs/operations.md "$doc/operations.md"
    # The example exactly as installed: `make uninstall` removes an unedited config by it.
    install -m 0644 "$SRC/config/displback.toml" "$doc/examples/displback.toml"
}

do_install() {
    refuse_if_packaged
    install_venv
    install_command
    install_unit
    install_config
    install_docs
    if systemd_running; then
        systemctl daemon-reload
        if systemctl -q is-active displback.service; then
            say "displback.service is running the old version: systemctl restart displback"
        fi
    fi
    say "installed $BINDIR/displback -> $VENVDIR, $UNITDIR/displback.service, $CONF, $DOCDIR"
}

do_uninstall() {
    refuse_if_packaged
    unit=$DESTDIR$UNITDIR/displback.service
    if systemd_running && [ -e "$unit" ]; then
        systemctl disable --now displback.service 2>/dev/null || true
    fi
    rm -f "$unit"
    systemd_running && systemctl daemon-reload
    link=$DESTDIR$BINDIR/displback
    case $(readlink "$link" 2>/dev/null || true) in
    *"$VENVDIR/bin/displback") rm -f "$link" ;;
    esac
    if [ -f "$DESTDIR$VENVDIR/$MARKER" ]; then
        rm -rf "$DESTDIR$VENVDIR"
    fi
    conf=$DESTDIR$CONF
    rm -f "$conf.dist"
    if [ -e "$conf" ]; then
        if cmp -s "$conf" "$DESTDIR$DOCDIR/examples/displback.toml" ||
            cmp -s "$conf" "$SRC/config/displback.toml"; then
            rm -f "$conf"
        else
            say "kept your edited $CONF"
        fi
    fi
    rmdir "$DESTDIR$CONFDIR" 2>/dev/null || true
    rm -rf "$DESTDIR$DOCDIR"
    say "uninstalled"
}

case ${1-} in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "usage: $0 install|uninstall" ;;
esac
