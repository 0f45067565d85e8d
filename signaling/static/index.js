// Home page: create a room. testids: room-title, create-room, student-link, open-teacher
"use strict";
document.getElementById("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("create-error");
  error.textContent = "";
  const title = document.getElementById("room-title").value.trim();
  const res = await CM.api("POST", "/api/rooms", null, { title });
  if (!res.ok) { error.textContent = "Could not create a room: " + ((res.data && res.data.error) || res.status); return; }
  document.getElementById("student-link").value = res.data.student_url;
  document.getElementById("open-teacher").href = res.data.teacher_url;
  document.getElementById("created").classList.remove("hidden");
});
document.getElementById("copy-link").addEventListener("click", async () => {
  const input = document.getElementById("student-link");
  try { await navigator.clipboard.writeText(input.value); } catch (e) { input.select(); document.execCommand("copy"); }
});
