"""M3's vision tower, projector and image/video processors (numpy/PIL at run time)."""
