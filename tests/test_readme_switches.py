"""The README's table of environment switches names exactly the TCAQ_* variables the package reads: a switch
added or removed without its line (or a line left for a removed switch) fails here."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_lists_every_environment_switch_the_package_reads():
    read = set()
    for path in (ROOT / "tcaq_kernels").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[(\[]\"(TCAQ_[A-Z0-9_]+)\"", path.read_text(encoding="utf-8")))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Environment switches", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `TCAQ_")]
    listed = {name for line in rows for name in re.findall(r"`(TCAQ_[A-Z0-9_]+)`", line.split(" | ")[0])}
    assert len(read) >= 10, read  # the scan itself still finds the switches
    assert listed == read, (f"in the code, not the README: {sorted(read - listed)}; "
                            f"in the README only: {sorted(listed - read)}")
