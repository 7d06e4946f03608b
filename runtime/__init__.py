"""Edge runtime: loads an artifact and scores frames. Never imports torch or timm."""
