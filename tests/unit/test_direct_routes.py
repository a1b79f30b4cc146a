"""The middleware answers the OpenAI POST endpoints itself (DIRECT_ROUTES), past FastAPI's router: this keeps
the two in step, so that a dependency or parameter added to one of those routes cannot be skipped silently."""

from __future__ import annotations

import inspect

from gateway.deps import get_state
from gateway.http.middleware import DIRECT_ROUTES
from gateway.routes import openai


def test_every_direct_route_is_a_thin_forward_in_routes_openai() -> None:
    routes = {route.path: route for route in openai.router.routes}
    for path, endpoint in DIRECT_ROUTES.items():
        route = routes.get(path)
        assert route is not None, f"{path} is answered directly but has no route in routes/openai.py"
        assert route.methods == {"POST"}
        dependant = route.dependant
        # Only the request and the state: anything more (a parameter, another dependency) would be skipped by
        # the middleware's direct call to forward(request, state, endpoint).
        assert [d.call for d in dependant.dependencies] == [get_state], path
        assert not (
            dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
        ), path
        assert dependant.request_param_name == "request"
        source = inspect.getsource(route.endpoint)
        assert f'forward(request, state, "{endpoint}")' in source, f"{path}: the route does not forward to {endpoint!r}"
