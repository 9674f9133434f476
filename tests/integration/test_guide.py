"""docs/guide.md runs: its command blocks, in order, against real Slurm 22.05, the real OpenID provider
and the proxy as a real HTTPS server, with the output the guide shows checked (tests/integration/guide.py).

Blocks marked ``site:`` need a real site (a provider registration, a booted systemd, a package
install) and are not collected; the runner does here what they would have done: the certificate from
the site's CA is one made now, the token a user would get from Check-in is alice's from the test
provider, and ``systemctl start`` is the unit's ExecStart with its credentials directory."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import SlurmCluster
from devstack._proc import free_port, spawn, tail, wait_until
from devstack.certs import TestPKI
from devstack.provider import INTERACTIVE_CLIENT, OidcProvider
from tests.integration import guide

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"
START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def guide_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The guide's paths are v0.0.38's: Slurm 22.05 (Debian 12's), the generation it is written for."""
    with SlurmCluster(tmp_path_factory.mktemp("guide-slurm"), "22.05") as cluster:
        yield cluster


class Site:
    """The admin's machine as the guide sees it, mapped onto the harness."""

    def __init__(self, root: Path, slurm: SlurmCluster, oidc: OidcProvider) -> None:
        self.root = root
        self.port = free_port()
        self.pki = TestPKI(root / "ca")
        socket = slurm.unix_socket
        assert socket is not None
        self.subs = guide.Substitutions(
            {
                "/etc/slurmproxy": str(root / "etc" / "slurmproxy"),
                "/var/log/slurmproxy": str(root / "var" / "log" / "slurmproxy"),
                "/run/slurmproxy-check": str(root / "run" / "slurmproxy-check"),
                "/etc/slurm/jwt_hs256.key": str(slurm.jwt_key_path),
                "/run/slurmrestd/slurmrestd.socket": str(socket),
                "https://aai.egi.eu/auth/realms/egi": oidc.issuer,
                "my-oidc-agent-client": INTERACTIVE_CLIENT,  # the client alice's token below comes from
                "slurmproxy.example.org:8443": f"127.0.0.1:{self.port}",
                "8443": str(self.port),
                "/home/alice": str(slurm.job_dir("alice")),
            }
        )
        bin_dir = Path(sys.executable).parent
        self.shell = guide.Shell(
            ROOT,
            guide.base_env(
                {
                    "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                    "SLURM_CONF": str(slurm.conf_path),
                    "CURL_CA_BUNDLE": str(self.pki.ca_cert),  # the site's CA, as a public CA would be known
                    "TOKEN": oidc.login("alice"),  # what `oidc-token egi` gives alice
                }
            ),
        )
        self.proxy: subprocess.Popen[bytes] | None = None
        self.slurm_key = slurm.jwt_key_path

    def install_certificate(self) -> None:
        """What the site's CA and the `install` lines of step 6 do."""
        pair = self.pki.server("proxy", hosts=("slurmproxy.example.org", "127.0.0.1", "localhost"))
        tls = self.root / "etc" / "slurmproxy" / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pair.chain, tls / "proxy.crt")
        shutil.copyfile(pair.key, tls / "proxy.key")
        (tls / "proxy.key").chmod(0o600)

    def serve(self) -> None:
        """``systemctl start slurmproxy``: LoadCredential= copies, then the unit's ExecStart."""
        credentials = self.root / "run" / "credentials" / "slurmproxy.service"
        credentials.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.slurm_key, credentials / "slurm-jwt-key")
        shutil.copyfile(self.root / "etc" / "slurmproxy" / "tls" / "proxy.key", credentials / "tls.key")
        config = self.root / "etc" / "slurmproxy" / "config.yaml"
        log = self.root / "proxy.log"
        env = dict(self.shell.env, CREDENTIALS_DIRECTORY=str(credentials))
        self.proxy = spawn([sys.executable, "-m", "slurmproxy", "serve", "--config", str(config)], log, env)
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))

        def live() -> bool:
            try:
                url = f"https://127.0.0.1:{self.port}/_slurmproxy/live"
                with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        def dead() -> str | None:
            assert self.proxy is not None
            code = self.proxy.poll()
            return None if code is None else f"slurmproxy exited with status {code}"

        wait_until(live, START_TIMEOUT, "the guide's proxy to answer over HTTPS", logs=[log], alive=dead)

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(30)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)

    def failure(self, block: guide.Block, message: str) -> str:
        log = tail(self.root / "proxy.log", 30) if (self.root / "proxy.log").exists() else ""
        return (
            f"docs/guide.md line {block.line}: {message}\n--- commands so far:\n"
            + "\n".join(self.shell.transcript[-2:])
            + (f"\n--- proxy log:\n{log}" if log else "")
        )

    def do(self, block: guide.Block) -> None:
        if block.kind == "file":
            target = Path(self.subs(block.path))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.subs(block.text))
        elif block.kind == "script":
            status, output = self.shell.run(self.subs(block.text))
            assert status == 0, self.failure(block, f"the script exited {status}")
        elif block.kind == "console":
            expected_status = int(next((w.split("=")[1] for w in block.info.split() if w.startswith("exit=")), "0"))
            for command, shown in guide.commands(block.text):
                status, output = self.shell.run(self.subs(command))
                assert status == expected_status, self.failure(block, f"`{command}` exited {status}")
                expected = [self.subs(line) for line in shown]
                assert guide.output_matches(expected, output.splitlines()), self.failure(
                    block, f"`{command}` printed something else than the guide shows:\n" + "\n".join(expected)
                )
        elif block.kind == "serve":
            self.serve()
        else:
            raise AssertionError(f"docs/guide.md line {block.line}: unknown runner action {block.kind!r}")


@pytest.fixture
def site(guide_slurm: SlurmCluster, oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    here = Site(tmp_path_factory.mktemp("guide-site"), guide_slurm, oidc)
    here.install_certificate()
    try:
        yield here
    finally:
        here.stop()


def test_the_guide_runs(site: Site, guide_slurm: SlurmCluster) -> None:
    steps = guide.blocks(GUIDE.read_text())
    assert [b.kind for b in steps].count("serve") == 1
    for block in steps:
        site.do(block)
    # The job the guide submitted ran as the account the guide's table names.
    audit = site.root / "var" / "log" / "slurmproxy" / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    submitted = [r for r in records if r["request_id"] == "first-job"]
    # A submission is recorded twice: its intent before it was forwarded, its outcome (with the job id) after.
    assert [r["kind"] for r in submitted] == ["intent", "outcome"], records[-5:]
    submitted = submitted[1:]
    job_id = submitted[0]["job_id"]
    assert guide_slurm.wait_job(job_id)["UserId"] == "alice(2001)"


def test_what_the_runner_leaves_to_a_site_says_why() -> None:
    markdown = GUIDE.read_text()
    left = guide.site_blocks(markdown)
    assert left, "the guide has steps only a site can do (registration, systemd); they must be marked"
    for line, reason in left:
        assert len(reason) > 10, f"docs/guide.md line {line}: a site block must say why the test cannot run it"
    kinds = [b.kind for b in guide.blocks(markdown)]
    assert kinds.count("console") >= 10 and "file" in kinds and "script" in kinds


def test_the_runner_matches_output_as_the_guide_says() -> None:
    """The matcher is strict where it should be: this test keeps the guide's checks meaningful."""
    assert guide.output_matches(["a", "...", "c"], ["a", "b", "b", "c"])
    assert guide.output_matches(["…OK…"], ["policy OK: 1 rule"])
    assert not guide.output_matches(["…OK…"], ["policy invalid"])
    assert not guide.output_matches(["a", "c"], ["a", "b", "c"])
    assert not guide.output_matches(["a"], ["a", "extra"])
    assert guide.output_matches([], ["anything"])  # no output shown: only the exit status counts
    assert guide.commands("$ one\nout\n$ two\n") == [("one", ["out"]), ("two", [])]
    blocks = guide.blocks("```sh site: needs a site\nx\n```\n```sh\ny\n```\n<!-- guide-runner: serve -->\n")
    assert [(b.kind, b.text) for b in blocks] == [("script", "y\n"), ("serve", "")]
