"""Evaluation videos: H.264 MP4 files (yuv420p, so browsers play them) written through imageio-ffmpeg."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from sacae.storage import atomic_path, write_failure


class VideoRecorder:
    """Collects frames of one episode and writes them to `<folder>/<name>.mp4` when saved."""

    def __init__(self, folder: str | Path | None, size: int = 256, fps: int = 30):
        self.folder = Path(folder) if folder is not None else None
        self.size = size
        self.fps = fps
        self.frames: list[np.ndarray] = []
        self.enabled = False

    def init(self) -> None:
        self.frames = []
        self.enabled = self.folder is not None

    def record(self, env) -> None:
        if self.enabled:
            self.frames.append(env.render(self.size, self.size))

    def save(self, name: str) -> Path | None:
        if not self.enabled or not self.frames:
            return None
        path = self.folder / f"{name}.mp4"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                writer = imageio.get_writer(
                    tmp,
                    format="FFMPEG",
                    mode="I",
                    fps=self.fps,
                    codec="libx264",
                    pixelformat="yuv420p",
                    macro_block_size=16,
                    ffmpeg_log_level="error",
                    output_params=["-f", "mp4"],
                )
                try:
                    for frame in self.frames:
                        writer.append_data(frame)
                finally:
                    writer.close()
        except Exception as e:
            raise write_failure(_as_os_error(e, self.folder), path, "an evaluation video") from None
        self.frames = []
        return path


def _as_os_error(error: Exception, folder: Path) -> OSError:
    """ffmpeg's failures reach us as a broken pipe or a plain message: call it a full disk when the disk is."""
    if isinstance(error, OSError) and error.errno is not None and error.errno != errno.EPIPE:
        return error
    try:
        full = shutil.disk_usage(folder if folder.is_dir() else folder.parent).free < 1024**2
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else str(error))


def video_codec(path: str | Path) -> str:
    """The codec name ffmpeg reports for the first video stream of `path` (e.g. h264)."""
    import subprocess

    import imageio_ffmpeg

    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", os.fspath(path)],
        capture_output=True,
        text=True,
    ).stderr
    for line in out.splitlines():
        if "Video:" in line:
            return line.split("Video:")[1].strip().split()[0]
    return ""
