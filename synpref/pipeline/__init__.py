"""The pipeline and its stages: `synpref reproduce`, stage processes, services, grids."""
