"""The web app: server-rendered pages (Jinja2) with htmx for the live parts, on the same
services as the HTTP API. Page routes authenticate the session cookie, check the CSRF token of
every form, call one service method and render; no logic lives in templates."""
