"""Ray Serve's autoscaler, measured on the engines: each replica reports the images waiting in its engine's queue
and running in its batch (`ImageService.record_autoscaling_stats`), and this policy asks for as many replicas as
those images, plus the requests Ray holds before any replica, divided by the target per replica. Ray applies the
bounds (min/max replicas) and the up- and downscale delays around it. No Ray import: the controller imports this."""
from __future__ import annotations

# The metric each replica reports (a custom autoscaling metric of Ray Serve), averaged over the look-back period.
ENGINE_IMAGES = "engine_images"


def engine_load_policy(ctx) -> tuple[float, dict]:
    """Replicas wanted for the load of the last look-back period (Ray's AutoscalingContext in, a count out)."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    target = ctx.config.get_target_ongoing_requests()
    reported = (ctx.aggregated_metrics or {}).get(ENGINE_IMAGES, {})
    running = set(ctx.running_replicas)
    images = [value for replica, value in reported.items() if replica in running]
    if not images:  # no report yet from the running replicas: Ray's own count of requests in flight
        return ctx.total_num_requests / target, {}
    # Replicas not reported yet count as carrying the mean load of those reported.
    load = sum(images) * len(running) / len(images) + (ctx.total_queued_requests or 0)
    return load / target, {}
