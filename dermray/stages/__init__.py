"""The Ray edges: one module per job, wiring the pure pieces of data/, models/, report/ and io/
to Ray Data and Ray Tune: extract, search, select (and export), predict; pipeline runs them in
order; raysession, progress and tracking are the Ray session, the console and MLflow."""
