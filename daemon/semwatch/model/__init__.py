"""The classifier model: backbone, artifact, training, evaluation, Grad-CAM."""
