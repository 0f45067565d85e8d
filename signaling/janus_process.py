"""Run Debian's Janus (VideoRoom only) as a child process with a minimal loopback configuration.

`scripts/run.sh` and the tests use this; operators who run their own Janus point `janus.url` at it
instead. The compose file's `janus` service runs this file as a script (stdlib only):
    JANUS_API_SECRET=... JANUS_ADMIN_KEY=... python3 janus_process.py --host 0.0.0.0 --nat-1-1 PUBLIC_IP
writes the same configuration and replaces itself with Janus. The configuration written here exposes only the WebSocket API, on the given address, behind an
API secret (every request must carry it), with the admin API off and the VideoRoom's `admin_key` set, so
only classmood (which holds both secrets) can create rooms, join them or subscribe to anyone.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("classmood.janus")

JANUS_BINARY = "/usr/bin/janus"
LIB_DIRS = [Path("/usr/lib/x86_64-linux-gnu/janus"), Path("/usr/lib/aarch64-linux-gnu/janus"), Path("/usr/lib/janus")]
# Everything Janus ships except the VideoRoom plugin and the WebSocket transport: less code listening.
DISABLED_PLUGINS = ["audiobridge", "duktape", "echotest", "lua", "nosip", "recordplay", "sip", "streaming",
                    "textroom", "videocall", "voicemail"]
DISABLED_TRANSPORTS = ["http", "mqtt", "nanomsg", "pfunix", "rabbitmq"]
INSTALL_HINT = "install it with `apt-get install janus` (scripts/setup.sh does) or point --janus-url at a running Janus"


class JanusNotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class JanusConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    api_secret: str = ""
    admin_key: str = ""
    rtp_ports: str = "20000-40000"
    ice_ignore: str = "vmnet,ifb"          # interfaces never used for media candidates
    nat_1_1: str = ""                     # public address of a NATed host (docker), empty on loopback
    string_ids: bool = True               # room and feed ids are strings (classmood's ids); False: numbers
    extra_plugins: tuple[str, ...] = ()   # plugins kept besides the VideoRoom (tests of other apps: "textroom")

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lib_dir() -> Path:
    for candidate in LIB_DIRS:
        if (candidate / "plugins").is_dir():
            return candidate
    raise JanusNotInstalled(f"Janus plugins not found in {', '.join(map(str, LIB_DIRS))}; {INSTALL_HINT}")


def janus_binary() -> str:
    found = shutil.which("janus") or (JANUS_BINARY if os.path.exists(JANUS_BINARY) else None)
    if not found:
        raise JanusNotInstalled(f"the Janus media server is not installed; {INSTALL_HINT}")
    return found


def write_config(folder: Path, config: JanusConfig) -> Path:
    """Write janus.jcfg and the two plugin/transport files Janus needs into `folder`; returns janus.jcfg."""
    libs = lib_dir()
    folder.mkdir(parents=True, exist_ok=True)
    disabled_plugins = ",".join(f"libjanus_{name}.so" for name in DISABLED_PLUGINS if name not in config.extra_plugins)
    disabled_transports = ",".join(f"libjanus_{name}.so" for name in DISABLED_TRANSPORTS)
    # Behind NAT (a container): advertise the public address, and keep the private one for peers on the
    # same network (the bot worker).
    nat = f'\tnat_1_1_mapping = "{config.nat_1_1}"\n\tkeep_private_host = true\n' if config.nat_1_1 else ""
    (folder / "janus.jcfg").write_text(f"""general: {{
\tconfigs_folder = "{folder}"
\tplugins_folder = "{libs / 'plugins'}"
\ttransports_folder = "{libs / 'transports'}"
\tevents_folder = "{libs / 'events'}"
\tloggers_folder = "{libs / 'loggers'}"
\tdebug_level = 3
\tapi_secret = "{config.api_secret}"
\tadmin_secret = "{secrets.token_urlsafe(24)}"
\tsession_timeout = 60
\tserver_name = "classmood-janus"
\tprotected_folders = ["/bin", "/boot", "/dev", "/etc", "/initrd", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr", "/var"]
}}
certificates: {{
}}
media: {{
\trtp_port_range = "{config.rtp_ports}"
}}
nat: {{
\tnice_debug = false
\tignore_mdns = true
\tice_ignore_list = "{config.ice_ignore}"
{nat}}}
plugins: {{
\tdisable = "{disabled_plugins}"
}}
transports: {{
\tdisable = "{disabled_transports}"
}}
loggers: {{
\tdisable = "libjanus_jsonlog.so"
}}
events: {{
\tbroadcast = false
}}
""")
    (folder / "janus.transport.websockets.jcfg").write_text(f"""general: {{
\tjson = "compact"
\tws = true
\tws_port = {config.port}
\tws_ip = "{config.host}"
\twss = false
}}
admin: {{
\tadmin_ws = false
\tadmin_wss = false
}}
""")
    # string_ids: classmood's room and peer ids are strings; admin_key: only classmood creates rooms.
    (folder / "janus.plugin.videoroom.jcfg").write_text(f"""general: {{
\tadmin_key = "{config.admin_key}"
\tlock_rtp_forward = true
\tstring_ids = {str(config.string_ids).lower()}
}}
""")
    return folder / "janus.jcfg"


class JanusProcess:
    """A Janus child process with its own config folder; `start()` returns once its API port accepts."""

    def __init__(self, config: JanusConfig, folder: Path | None = None, log_file: Path | None = None) -> None:
        self.config = config
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="classmood-janus-")
        self.folder = Path(folder) if folder else Path(self._tmp.name if self._tmp else ".")
        self.log_file = log_file or self.folder / "janus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self, timeout: float = 20.0) -> None:
        binary = janus_binary()
        main_config = write_config(self.folder, self.config)
        log_handle = open(self.log_file, "ab")
        # -C/-F: our files only (never /etc/janus); stdout goes to a log file we can show on failure.
        self.process = subprocess.Popen(
            [binary, "-C", str(main_config), "-F", str(self.folder), "-o"],
            stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log_handle.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Janus exited at start (code {self.process.returncode}); its log: "
                                   f"{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection(self.config.host, self.config.port)
                writer.close()
                log.info("Janus started (pid %s) on %s", self.process.pid, self.config.url)
                return
            except OSError:
                await asyncio.sleep(0.1)
        self.kill()
        raise RuntimeError(f"Janus did not open {self.config.url} within {timeout:.0f} s; its log: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(sig)

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.running():
            self.process.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 5)
            except asyncio.TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.process = None

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Container entry point: write the configuration from flags and environment, then exec Janus."""
    import argparse
    parser = argparse.ArgumentParser(description="Janus configured for classmood (VideoRoom + WebSocket API)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the WebSocket API")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--rtp-ports", default="20000-40000", help="UDP port range for media")
    parser.add_argument("--nat-1-1", default="", help="public IP to advertise (Janus behind NAT)")
    parser.add_argument("--config-dir", default=os.path.join(tempfile.gettempdir(), "classmood-janus"))
    args = parser.parse_args(argv)
    api_secret, admin_key = os.environ.get("JANUS_API_SECRET", ""), os.environ.get("JANUS_ADMIN_KEY", "")
    if len(api_secret) < 16 or len(admin_key) < 16:
        raise SystemExit("error: set JANUS_API_SECRET and JANUS_ADMIN_KEY (16+ characters each)")
    config = JanusConfig(args.host, args.port, api_secret, admin_key, args.rtp_ports, nat_1_1=args.nat_1_1)
    main_config = write_config(Path(args.config_dir), config)
    binary = janus_binary()
    os.execv(binary, [binary, "-C", str(main_config), "-F", args.config_dir, "-o"])


if __name__ == "__main__":
    main()
