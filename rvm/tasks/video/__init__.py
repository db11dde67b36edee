"""Videos of moving digits: motion recognition and frame prediction (`task`), the clips of
truncated and overlap-coherence training (`clips`), and frame-quality measures
(`image_quality`)."""
