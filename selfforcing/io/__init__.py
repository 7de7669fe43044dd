"""Video files in and out (PyAV for mp4, Pillow for GIF and PNG contact sheets)."""

from .video import Mp4Writer, read_video, to_float_video, to_uint8_frames, write_contact_sheet, write_gif, write_mp4

__all__ = ["Mp4Writer", "read_video", "to_float_video", "to_uint8_frames", "write_contact_sheet", "write_gif",
           "write_mp4"]
