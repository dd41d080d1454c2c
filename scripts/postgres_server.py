"""A throw-away PostgreSQL server for tests and the chaos soak: Debian's binaries, run as user
postgres (the server refuses root), on a free local port, in a temporary folder removed at the
end. User postgres connects without a password; every other role must give its password
(scram-sha-256). ``stop``, ``start`` and ``restart`` make outages.

    server = ThrowawayPostgres.create()        # None where the binaries or root are missing
    server.sql("CREATE DATABASE clipse"); url = server.url("clipse")
    ...
    server.close()
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

AS_POSTGRES = ["runuser", "-u", "postgres", "--"]


class ThrowawayPostgres:
    def __init__(self, bin_dir: str, folder: str, port: int):
        self.bin_dir, self.folder, self.port = bin_dir, folder, port

    @classmethod
    def create(cls) -> "ThrowawayPostgres | None":
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins or os.geteuid() != 0 or not shutil.which("runuser"):
            return None
        folder = tempfile.mkdtemp(prefix="clipse-pg-", dir="/tmp")
        shutil.chown(folder, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = cls(bins[-1], folder, port)
        subprocess.run([*AS_POSTGRES, f"{server.bin_dir}/initdb", "-D", f"{folder}/data", "--auth=trust", "-U",
                        "postgres"], check=True, capture_output=True)
        Path(f"{folder}/data/pg_hba.conf").write_text(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        server.start()
        return server

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*AS_POSTGRES, f"{self.bin_dir}/pg_ctl", "-D", f"{self.folder}/data", *args], check=True,
                       capture_output=True)

    def start(self) -> None:
        self._pg_ctl("-l", f"{self.folder}/log", "-w", "-o",
                     f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self, fast: bool = True) -> None:
        self._pg_ctl("-m", "fast" if fast else "smart", "-w", "stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: the sessions are cut, the server is back in about a second."""
        self._pg_ctl("-l", f"{self.folder}/log", "-w", "-m", "fast", "-o",
                     f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "restart")

    def sql(self, statement: str, database: str = "postgres") -> None:
        subprocess.run([*AS_POSTGRES, f"{self.bin_dir}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-d", database,
                        "-v", "ON_ERROR_STOP=1", "-c", statement], check=True, capture_output=True)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        subprocess.run([*AS_POSTGRES, f"{self.bin_dir}/pg_ctl", "-D", f"{self.folder}/data", "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)
