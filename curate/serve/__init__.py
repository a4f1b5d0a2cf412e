"""The hosting layer: a Ray Serve application over the LanceDB table (REST API, on-demand
features, gallery). `catalog` reads the table, `features` computes features with the
pipeline's own stages, `app` wires both into Serve deployments."""
