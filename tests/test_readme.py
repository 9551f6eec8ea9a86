"""README.md's code blocks, run as a newcomer runs them: a promise the README makes ("this works") is only kept
while something runs it.

The conventions (also in a comment at the top of README.md): every ```python and ```bash block runs, in a fresh
directory where `speculor/` is this repository's package (so `speculor/models/target` names the shipped target, as
it does from the repository's root), with this interpreter's environment first on the PATH and the Hugging Face hub
offline. A block that cannot run on a CPU in seconds carries `<!-- not run: why -->` on the line above its fence;
its `speculor` commands are still parsed, and its Python compiled, so a renamed option breaks this test too. A
block marked `<!-- serves in the background for the next block -->` is one `speculor serve` command: it is started
on a free port and the Python block after it, pointed at that port, is run against it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from speculor.cli import build_parser

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
RUN_LANGUAGES = ("python", "bash")
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*) -->")
BACKGROUND_SERVER = "<!-- serves in the background for the next block -->"
# A block still running after this long is not sized for the test (or is a server nobody marked as one).
BLOCK_SECONDS = 180
SERVER_START_SECONDS = 120
README_PORT = "127.0.0.1:8000"
# Words that end one shell command and start the next, as shlex's punctuation mode splits them.
COMMAND_SEPARATORS = {";", "&&", "||", "|", "&", ">", ">>", "<"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language tag, its text, the README line of its opening fence, and the HTML
    comment on the line above that fence ("" when there is none)."""

    language: str
    code: str
    line: int
    marker: str

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and NOT_RUN.fullmatch(self.marker) is None

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.language})"


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"```(\w*)", lines[index])
        if opening is None:
            index += 1
            continue
        closing = lines.index("```", index + 1)
        above = lines[index - 1].strip() if index else ""
        marker = above if above.startswith("<!--") and above.endswith("-->") else ""
        blocks.append(Block(opening.group(1), "\n".join(lines[index + 1 : closing]) + "\n", index + 1, marker))
        index = closing + 1
    return blocks


BLOCKS = readme_blocks()
SERVED = [(server, BLOCKS[BLOCKS.index(server) + 1]) for server in BLOCKS if server.marker == BACKGROUND_SERVER]
SERVED_BLOCKS = {block for pair in SERVED for block in pair}
RUNNABLE = [block for block in BLOCKS if block.runs and block not in SERVED_BLOCKS]


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, each as its words (comments, line continuations and leading variable
    assignments dropped, redirections and pipes splitting commands)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in COMMAND_SEPARATORS:
                if command:
                    commands.append(command)
                command = []
            elif command or not re.fullmatch(r"[A-Za-z_]\w*=.*", word):
                command.append(word)
    return commands


def speculor_arguments(command: list[str]) -> list[str] | None:
    """The arguments a shell command passes to speculor (`speculor …`, `torchrun … -m speculor …`, `python -m
    speculor …`), or None for any other command."""
    if command[0] == "speculor":
        return command[1:]
    for index in range(len(command) - 1):
        if command[index : index + 2] == ["-m", "speculor"]:
            return command[index + 2 :]
    return None


def block_environment() -> dict[str, str]:
    """This interpreter's tools first on the PATH (as `. .venv/bin/activate` would do) and no hub downloads: a
    block that needs one must say so instead."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    return environment


def fresh_directory(path: Path) -> Path:
    """`path` as a newcomer's repository root: `speculor/` is the package, nothing else is there yet."""
    (path / "speculor").symlink_to(REPOSITORY / "speculor", target_is_directory=True)
    return path


def run_block(block: Block, directory: Path) -> subprocess.CompletedProcess:
    script = directory / ("readme_block.py" if block.language == "python" else "readme_block.sh")
    script.write_text(block.code)
    interpreter = [sys.executable] if block.language == "python" else ["bash", "-e", "-o", "pipefail"]
    try:
        return subprocess.run(
            [*interpreter, script.name],
            cwd=directory,
            env=block_environment(),
            capture_output=True,
            text=True,
            timeout=BLOCK_SECONDS,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block} was still running after {BLOCK_SECONDS} s: size it down, or mark it `not run: why`")


def failure(block: Block, done: subprocess.CompletedProcess) -> str:
    return (
        f"{block} exited with {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )


def test_every_block_runs_or_says_why_not():
    """Markers are the known ones, each `not run` gives its reason, a served block is one `speculor serve` followed
    by a runnable Python block, and the README keeps runnable examples of both languages."""
    for block in BLOCKS:
        assert block.marker in ("", BACKGROUND_SERVER) or NOT_RUN.fullmatch(block.marker), (str(block), block.marker)
    for server, client in SERVED:
        commands = shell_commands(server.code)
        assert server.language == "bash" and len(commands) == 1 and commands[0][:2] == ["speculor", "serve"], server
        assert client.language == "python" and client.runs and README_PORT in client.code, client
    assert {block.language for block in RUNNABLE} == set(RUN_LANGUAGES)
    assert len(RUNNABLE) >= 5


def test_every_speculor_command_in_the_readme_parses():
    """Each `speculor` command of every shell block, run or not, is accepted by the real argument parser, and every
    Python block compiles: what cannot run here must still be right as written."""
    parser = build_parser()
    parsed = 0
    for block in BLOCKS:
        if block.language == "python":
            compile(block.code, str(block), "exec")
        if block.language != "bash":
            continue
        for command in shell_commands(block.code):
            arguments = speculor_arguments(command)
            if arguments is None:
                continue
            try:
                parser.parse_args(arguments)
            except SystemExit:
                pytest.fail(f"{block}: `speculor {shlex.join(arguments)}` does not parse")
            parsed += 1
    assert parsed >= 10


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{block.line}" for block in RUNNABLE])
def test_readme_block_runs(block: Block, tmp_path: Path):
    done = run_block(block, fresh_directory(tmp_path))
    assert done.returncode == 0, failure(block, done)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the README's server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"the README's server did not answer /health within {SERVER_START_SECONDS} s:\n{log.read_text()}")


@pytest.mark.parametrize("server, client", SERVED, ids=[f"line{server.line}" for server, _ in SERVED])
def test_readme_server_answers_the_client_block_after_it(server: Block, client: Block, tmp_path: Path):
    """The README's `speculor serve`, on a free port instead of 8000 (another server may hold that one), answers its
    client block, pointed at that port; Ctrl-C then stops it cleanly."""
    directory = fresh_directory(tmp_path)
    port = free_port()
    (command,) = shell_commands(server.code)
    log = directory / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=directory,
            env=block_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(port, process, log)
        done = run_block(replace(client, code=client.code.replace(README_PORT, f"127.0.0.1:{port}")), directory)
        assert done.returncode == 0, failure(client, done)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # 130 is what `speculor` exits with when Ctrl-C stops it (speculor.cli.main); anything else means it crashed.
    assert process.returncode in (0, 130), log.read_text()[-4000:]
