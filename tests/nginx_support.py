"""A real nginx in front of the service, for the tests: started on a free loopback port with its own config, files
and pid in the test's folder, stopped by its pid at the end.

Debian's nginx (`make nginx` installs it as root). Without it the tests skip with the reason, unless
ASIRRA_REQUIRE_NGINX=1 (as in CI), where that is a failure.
"""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from redis_support import free_port, installed_or_skip

START_SECONDS = 10.0
# As docs/guides/deploying.md tells an operator to proxy: nginx appends the address it saw to X-Forwarded-For.
CONFIG = """daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /metrics {{ return 404; }}
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx executable, or skip (fail when ASIRRA_REQUIRE_NGINX=1)."""
    return installed_or_skip("nginx", "ASIRRA_REQUIRE_NGINX",
                             "nginx is not installed (apt-get install nginx; `make nginx` does it as root)",
                             where=("/usr/sbin/nginx",))


@contextmanager
def nginx_in_front_of(upstream_port: int, folder: Path) -> Iterator[str]:
    """nginx on 127.0.0.1:<free port> proxying to 127.0.0.1:`upstream_port`; yields its URL."""
    binary = nginx_binary()
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "nginx.conf").write_text(CONFIG.format(folder=folder, port=port, upstream=upstream_port))
    log = open(folder / "stderr.log", "ab")
    command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}: "
                                   f"{(folder / 'error.log').read_text(errors='replace')[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not listen within {START_SECONDS:.0f} s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
