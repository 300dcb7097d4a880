"""What runs where the model runs (the inference worker process): worker loop, predictor, engines, drift."""
