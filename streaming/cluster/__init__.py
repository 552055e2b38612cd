"""Many engine replicas behind one front door: placement by capacity (``placement``), the HTTP front door that
speaks the single server's API and forwards each session's requests to the replica that owns it (``frontdoor``),
metrics aggregation (``metrics``) and the Ray Serve application that runs the replicas (``ray_app``, needs the
optional ``ray`` extra; nothing else in this package imports Ray)."""
