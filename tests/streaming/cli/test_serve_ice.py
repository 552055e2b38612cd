"""``engine serve --ice-server``: a URL the server cannot use is refused before anything starts, naming it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from streaming.cli import main


@pytest.mark.parametrize(
    "url, words",
    [
        ("stun.example.net", "not a stun:/turn:/turns: URL"),
        ("turn:turn.example.net:3478", "needs a username and a credential"),
        ("turns:u:p@turn.example.net?transport=udp", "runs over TLS"),
        ("stun:u:p@stun.example.net", "takes no credentials"),
    ],
)
def test_unusable_ice_servers_are_refused(url: str, words: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--webrtc", "--ice-server", url])
    assert result.exit_code == 2, result.output
    assert "--ice-server" in result.output and words in result.output
