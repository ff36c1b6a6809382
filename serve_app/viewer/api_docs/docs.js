// Swagger UI on this application's OpenAPI document, set up as FastAPI's own /docs page sets it up. A file of its
// own, not an inline script: the Content-Security-Policy allows no inline script.
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
