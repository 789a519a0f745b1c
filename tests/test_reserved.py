"""Packages reserved for an independent held-out evaluation must appear nowhere in the project.

The names are compared by hash, so that this test does not itself spell them out.
"""

import hashlib
import re
import subprocess

from tests.conftest import ROOT

# sha256 prefixes of the reserved packages' distinctive name parts
RESERVED_WORD_HASHES = {
    "c3f71597170d14b8",
    "24d9e7a2dd0f9544",
    "3733102be5de8c9c",
    "75282f9d47b2a657",
    "56dc60298d6b2bb3",
}


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listed.stdout.splitlines() if line]


def test_reserved_packages_appear_nowhere():
    hits = []
    for name in project_files():
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore").lower()
        for word in set(re.findall(r"[a-z0-9]+", text)) | set(re.findall(r"[a-z0-9]+", name.lower())):
            if hashlib.sha256(word.encode()).hexdigest()[:16] in RESERVED_WORD_HASHES:
                hits.append((name, word))
    assert hits == []


def test_the_check_can_fail():
    word = "".join(["wes", "noth"])
    assert hashlib.sha256(word.encode()).hexdigest()[:16] in RESERVED_WORD_HASHES
