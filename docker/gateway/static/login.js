// The token goes to the gateway once, as a bearer header (never in a URL, so never in a log or
// the history); the answer sets an HttpOnly session cookie that the UI and its WebSocket then use.
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = document.getElementById("message");
  const token = document.getElementById("token").value.trim();
  message.textContent = "Signing in…";
  const response = await fetch("/login/session", {
    method: "POST", credentials: "same-origin", headers: { Authorization: "Bearer " + token },
  });
  if (response.status === 204) {
    // Shown in place of a protected page: reload it; on /login itself go to ComfyUI's UI.
    window.location.replace(window.location.pathname === "/login" ? "/" : window.location.href);
  } else {
    message.textContent = response.status === 401 ? "That token is not valid for this host."
                                                   : "Sign-in failed (HTTP " + response.status + ").";
  }
});
