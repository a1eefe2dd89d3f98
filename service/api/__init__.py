"""The endpoints, one module per group: each declares its routes from `service.route_table` and calls `core`
and `v2`; the transports in `service.http` and `service.grpc_v2` carry requests to them."""
