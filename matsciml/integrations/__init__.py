"""Trained models used outside training: the ASE calculator, batch prediction, and torch-sim."""
