"""The folders the UI may touch, and the check every path from a browser goes through.

The UI reads images, captions, recipes and run folders by paths a browser sends, so a path is only
used after `Roots.confine` turned it into a real path inside one of the configured root folders.
Every symlink is resolved *before* the check: a link planted in a dataset folder (`rex/key ->
~/.ssh/id_ed25519`, or a folder `rex/home -> ~`) resolves outside the roots and is refused, so the
UI cannot be used to read or write the rest of the machine. `..` is refused outright, even where it
would land inside, so no path needs normalising to judge it.

What this does not guard: a link swapped in between the check and the use (the threat here is a
link already lying in a folder, not a local attacker racing the UI).
"""

import os
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import FinetuneError, safe_name


class PathRefused(FinetuneError):
    """A path outside the UI's root folders, or one that cannot be judged (`..`, NUL, missing)."""


def _refused(path, why: str) -> PathRefused:
    return PathRefused(f"{safe_name(path)}: {why}")


class Roots:
    """The root folders, stored as real paths; `confine` checks a path against them."""

    def __init__(self, folders: list[str | Path]):
        self.folders: list[Path] = []
        for folder in folders:
            if not Path(folder).is_dir():
                raise _refused(folder, "not an existing folder, cannot be a root of the UI")
            real = Path(folder).resolve(strict=True)
            if real not in self.folders:
                self.folders.append(real)
        if not self.folders:
            raise PathRefused("the UI needs at least one root folder")

    def confine(self, path: str | Path, must_exist: bool = True) -> Path:
        """The real path of `path` (absolute, or relative to the first root) if it lies inside a
        root once every symlink on it is followed; else PathRefused."""
        if not isinstance(path, (str, Path)):
            raise PathRefused(f"not a path: {type(path).__name__}")
        text = str(path)
        if not text:
            raise PathRefused("an empty path")
        if "\x00" in text:
            raise _refused(text, "a NUL byte in a path")
        given = Path(text)
        if ".." in given.parts:
            raise _refused(text, "'..' is not allowed in a path")
        if not given.is_absolute():
            given = self.folders[0] / given
        try:
            # Non-strict resolve follows every link, dangling ones too, and keeps only the missing
            # tail as written: so a new file's nearest existing parent is what gets checked.
            real = given.resolve(strict=must_exist)
        except FileNotFoundError:
            raise _refused(text, "does not exist") from None
        except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13), no permission
            raise _refused(text, f"cannot be resolved ({getattr(e, 'strerror', None) or 'symlink loop'})") from None
        if self._root_of(real) is None:
            raise _refused(text, "outside the UI's root folders (after following symlinks)")
        return real

    def display(self, path: Path) -> str:
        """A confined path as the UI shows it: the name of the root holding it, then the path below
        that root ("photos/rex/dog1.png"), so no absolute path of the machine reaches the page."""
        path = Path(path)
        root = self._root_of(path)
        if root is None:
            raise _refused(path, "outside the UI's root folders")
        head = root.name or str(root)
        rest = path.relative_to(root).as_posix()
        return head if rest == "." else f"{head}/{rest}"

    def walk(self, max_depth: int = 4) -> Iterator[Path]:
        """Every directory under the roots (roots included, as real paths), at most `max_depth`
        levels below its root; a symlinked folder is followed only when it resolves inside a root,
        and each real folder comes once (so link loops end)."""
        seen: set[Path] = set()
        for root in self.folders:
            yield from self._walk(root, max_depth, seen)

    def _walk(self, folder: Path, depth: int, seen: set[Path]) -> Iterator[Path]:
        if folder in seen:
            return
        seen.add(folder)
        yield folder
        if depth <= 0:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable folder: skip it, a scan must not fail on one
            return
        for entry in entries:
            try:
                if not entry.is_dir():
                    continue
                real = Path(entry.path).resolve(strict=True) if entry.is_symlink() else Path(entry.path)
            except (OSError, RuntimeError):
                continue
            if self._root_of(real) is not None:
                yield from self._walk(real, depth - 1, seen)

    def _root_of(self, real: Path) -> Path | None:
        """The innermost root holding `real` (roots may nest), or None."""
        holding = [root for root in self.folders if real.is_relative_to(root)]
        return max(holding, key=lambda root: len(root.parts)) if holding else None
