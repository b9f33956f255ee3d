"""The console pages, one module each; `gateway.console.app` routes them."""
