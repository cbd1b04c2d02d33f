"""The web server: HTTP (h11), admission, TLS, basic auth, the web config, rate limit, headers, the live view."""
