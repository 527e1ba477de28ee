"""`fluxstack doctor`'s pieces on fixed inputs: /proc/net/tcp parsing (IPv4 and IPv6, listening
sockets only) and secret-file modes. The whole command runs against a real gateway in
tests/integration/test_gateway.py."""

from pathlib import Path

import pytest

from fluxstack.doctor import check_secret_file, is_loopback, listening_sockets
from fluxstack.errors import UsageError

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def test_listening_sockets_decodes_both_families_and_skips_connections(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(HEADER +
        "   0: 0100007F:1F40 00000000:0000 0A 0 0 0 0 0 1\n"   # 127.0.0.1:8000
        "   1: 00000000:20FB 00000000:0000 0A 0 0 0 0 0 2\n"   # 0.0.0.0:8443
        "   2: 0100007F:1F40 0100007F:D431 01 0 0 0 0 0 3\n")  # established
    zero = "0" * 32
    (tmp_path / "tcp6").write_text(HEADER +
        f"   0: {zero}:1FFC {zero}:0000 0A 0 0 0 0 0 4\n"                            # [::]:8188
        f"   1: 00000000000000000000000001000000:1F92 {zero}:0000 0A 0 0 0 0 0 5\n")  # [::1]:8082
    found = listening_sockets(tmp_path)
    assert found == [("127.0.0.1", 8000), ("::1", 8082), ("::", 8188), ("0.0.0.0", 8443)]
    assert [is_loopback(a) for a, _ in found] == [True, True, False, False]


def test_no_proc_is_an_environment_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="/proc"):
        listening_sockets(tmp_path)


@pytest.mark.parametrize(("mode", "status"), [(0o400, "ok"), (0o600, "ok"), (0o640, "FAIL"), (0o644, "FAIL"),
                                              (0o604, "FAIL")])
def test_secret_files_must_be_private(tmp_path: Path, mode: int, status: str) -> None:
    secret = tmp_path / "tokens"
    secret.write_text("x" * 32)
    secret.chmod(mode)
    check = check_secret_file(secret)
    assert check.status == status, check
    assert f"{mode:04o}" in check.detail


def test_a_missing_secret_file_fails(tmp_path: Path) -> None:
    assert check_secret_file(tmp_path / "absent").status == "FAIL"
