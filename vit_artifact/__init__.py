"""The artifact contract between `model_export` (which writes artifacts) and `service` (which serves them).

What an artifact is (`metadata`: `artifact.json`; `serving`: `serving.json`) and the maths both sides must do
the same way (`preprocessing`: image to input tensor; `attention`: attention tensor to maps). It imports neither
side, and raises plain exceptions that each side turns into its own errors.
"""
