"""`make install` into a staging root (DESTDIR) puts the command, the unit, the config and the
docs where the unit expects them, in a venv that names its final path, never overwrites an
edited config; `make uninstall` takes back exactly that.

No network: the venv is built from the wheelhouse `make test` keeps beside its own venv
(``make wheelhouse``), with the interpreter this venv was made from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_service import verify_unit

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
MAKE = shutil.which("make")


def _install_python() -> str:
    """Debian's interpreter, as on a Dom0, when the wheelhouse fits it; else this venv's base."""
    debian = Path("/usr/bin/python3")
    if debian.exists():
        same = subprocess.run(
            [str(debian), "-c", "import ensurepip, sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if same == str(sys.version_info[:2]):
            return str(debian)
    return os.path.realpath(sys._base_executable)


INSTALL_PYTHON = _install_python()

pytestmark = [
    pytest.mark.skipif(
        not (WHEELHOUSE / ".complete").exists(),
        reason=f"no wheelhouse in {WHEELHOUSE} (make wheelhouse; make test builds it)",
    ),
]


def make(target: str, destdir: Path, *variables: str) -> str:
    assert MAKE is not None, "make missing"
    done = subprocess.run(
        [
            MAKE, "-s", "-C", str(REPO), target, f"DESTDIR={destdir}",
            f"WHEELHOUSE={WHEELHOUSE}", f"INSTALL_PYTHON={INSTALL_PYTHON}",
            *variables,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stage") / "root"
    make("install", root)
    return root


def copy_of(staged: Path, tmp_path: Path) -> Path:
    """A copy to change: hard links (install and uninstall replace or remove files, never
    write into them), real copies under etc/ (the tests edit the config in place)."""
    root = tmp_path / "root"
    shutil.copytree(staged, root, symlinks=True, copy_function=os.link)
    shutil.rmtree(root / "etc")
    shutil.copytree(staged / "etc", root / "etc", symlinks=True)
    return root


def files_in(root: Path) -> list[str]:
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_symlink() or not path.is_dir()
    )


def test_install_puts_command_unit_config_and_docs_where_the_unit_expects_them(
    staged: Path,
) -> None:
    unit = (staged / "etc/systemd/system/displback.service").read_text()
    assert unit == (REPO / "systemd/displback.service").read_text()
    command = staged / "usr/bin/displback"
    # Relative, so that it resolves inside the staging root as it will on the Dom0.
    assert os.readlink(command) == "../../opt/displback/bin/displback"
    assert command.resolve() == (staged / "opt/displback/bin/displback").resolve()
    assert os.access(command, os.X_OK)
    config = staged / "etc/displback/displback.toml"
    assert config.read_bytes() == (REPO / "config/displback.toml").read_bytes()
    doc = staged / "usr/share/doc/displback"
    assert (doc / "README.md").is_file()
    assert (doc / "operations.md").resolve() == (doc / "docs/operations.md").resolve()
    assert (doc / "docs/operations.md").is_file()
    assert (doc / "examples/displback.toml").read_bytes() == config.read_bytes()


def test_the_venv_names_its_final_path_not_the_staging_root(staged: Path) -> None:
    venv = staged / "opt/displback"
    script = (venv / "bin/displback").read_text()
    assert script.startswith("#!/opt/displback/bin/python\n")
    texts = [p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    texts += [venv / "pyvenv.cfg"]
    texts += list((venv / "lib").rglob("displback/**/__pycache__/*.pyc"))
    assert len(texts) > 20
    for path in texts:
        assert str(staged).encode() not in path.read_bytes(), path
        assert b"/opt/displback.new." not in path.read_bytes(), path


def test_the_installed_command_runs_from_its_own_venv(staged: Path, tmp_path: Path) -> None:
    venv = staged / "opt/displback"
    done = subprocess.run(
        [str(venv / "bin/python"), str(venv / "bin/displback"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the checkout: displback must come from the venv
    )
    assert done.returncode == 0, done.stderr
    assert "usage: displback" in done.stdout
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import displback, trio, numpy, PIL; "
         "print(displback.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv / "lib"))
    # The installed default configuration is one the installed daemon accepts.
    check = subprocess.run(
        [str(venv / "bin/python"), str(venv / "bin/displback"), "check-config",
         str(staged / "etc/displback/displback.toml")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_systemd_analyze_verify_accepts_the_installed_unit(staged: Path, tmp_path: Path) -> None:
    unit = (staged / "etc/systemd/system/displback.service").read_text()
    # verify looks for ExecStart's program on this machine: look in the staging root instead.
    inside = unit.replace("ExecStart=/usr/bin/displback ", f"ExecStart={staged}/usr/bin/displback ")
    assert inside != unit
    verify_unit(inside, tmp_path)


def test_install_with_another_prefix_points_the_unit_at_that_command(
    staged: Path, tmp_path: Path
) -> None:
    root = copy_of(staged, tmp_path)
    out = make("install", root, "PREFIX=/usr/local")
    assert "is up to date" in out  # the venv is reused, not rebuilt
    unit = (root / "etc/systemd/system/displback.service").read_text()
    assert "ExecStart=/usr/local/bin/displback run " in unit
    assert "Documentation=file:///usr/local/share/doc/displback/operations.md" in unit
    assert (root / "usr/local/bin/displback").resolve() == (
        root / "opt/displback/bin/displback"
    ).resolve()


def test_reinstall_keeps_an_edited_config_and_uninstall_keeps_only_that(
    staged: Path, tmp_path: Path
) -> None:
    root = copy_of(staged, tmp_path)
    config = root / "etc/displback/displback.toml"
    edited = config.read_text().replace('display = "kms"', 'display = "virtual"')
    config.write_text(edited)
    out = make("install", root)
    assert config.read_text() == edited
    dist = root / "etc/displback/displback.toml.dist"
    assert dist.read_bytes() == (REPO / "config/displback.toml").read_bytes()
    assert "kept your edited /etc/displback/displback.toml" in out
    out = make("uninstall", root)
    assert files_in(root) == ["etc/displback/displback.toml"]
    assert config.read_text() == edited
    assert "kept your edited /etc/displback/displback.toml" in out


def test_uninstall_of_an_unedited_install_leaves_no_file(staged: Path, tmp_path: Path) -> None:
    root = copy_of(staged, tmp_path)
    assert len(files_in(root)) > 1000
    make("uninstall", root)
    assert files_in(root) == []
    assert not (root / "opt/displback").exists()
    assert not (root / "etc/displback").exists()


def test_install_refuses_to_replace_a_venv_it_did_not_make(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt/displback/bin").mkdir(parents=True)
    assert MAKE is not None, "make missing"
    done = subprocess.run(
        [MAKE, "-s", "-C", str(REPO), "install", f"DESTDIR={root}", f"WHEELHOUSE={WHEELHOUSE}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "was not made by this installer" in done.stderr
    assert files_in(root) == []


def test_the_deb_holds_the_staged_tree_with_the_config_as_a_conffile(
    staged: Path, tmp_path: Path
) -> None:
    assert shutil.which("dpkg-deb") is not None, "dpkg-deb missing (Debian's dpkg)"
    root = copy_of(staged, tmp_path)
    # `make deb` stages with UNITDIR=/lib/systemd/system, the place for a package's units.
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/displback.service").rename(
        root / "lib/systemd/system/displback.service"
    )
    done = subprocess.run(
        ["sh", "packaging/deb.sh", str(root), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "DEB_COMPRESSION": "none"},  # the test reads it, nobody ships it
    )
    if "must be made with Debian's /usr/bin/python3" in done.stderr:
        pytest.skip("the test's interpreter is not Debian's")
    assert done.returncode == 0, done.stdout + done.stderr
    (deb,) = (tmp_path / "out").glob("displback_*.deb")
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True).stdout
    assert "Package: displback" in info
    assert f"Depends: python{sys.version_info.major}.{sys.version_info.minor}, libatomic1" in info
    conffiles = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    assert b"/etc/displback/displback.toml\n" in conffiles
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    for path in (
        "./usr/bin/displback -> ../../opt/displback/bin/displback",
        "./lib/systemd/system/displback.service",
        "./etc/displback/displback.toml",
        "./opt/displback/bin/displback",
        "./usr/share/doc/displback/docs/operations.md",
    ):
        assert path in listing, path
    assert "./etc/systemd/system/displback.service" not in listing
