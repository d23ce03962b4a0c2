"""The Train tab's scripts that run in the browser alone, with no request: what the resume box
and the form's refusal become after an action or an edit (:mod:`ui.train` wires them)."""

# The resume box after Resume: 0 (the run's own max steps) once a resume went through; after a
# refusal, the step as typed, for the person to correct.
RESUMED_JS = ("(action, until) => (action && action.kind === 'ok' && action.action === 'resume')"
              " ? 0 : until")
# The last action once the person edits the form: a refused Start or Queue is about the form as it
# was, so it goes (the message stayed up after the field it named was fixed); anything else stays.
CLEAR_REFUSAL_JS = ("(action) => (action && action.kind === 'error' && "
                    "['start', 'queue'].includes(action.action)) ? null : action")

# A refusal about one field (``failed_action``'s ``field``) shows that field: "more settings" opened
# when it is in there, the field scrolled to and focused, outlined with the reason under it (the
# message sits above the form, and the field could be out of sight). Any other action, or an edit
# (which clears the refusal), takes the mark away.
SHOW_REFUSED_FIELD_JS = """async (action) => {
  const turn = window.maeRefusalTurn = (window.maeRefusalTurn || 0) + 1;  // the newest call wins
  for (const old of document.querySelectorAll('#train-form [data-refusal]')) {
    old.removeAttribute('data-refusal');
    old.querySelector('[aria-invalid]')?.removeAttribute('aria-invalid');
    old.querySelector('[aria-describedby$="-refusal"]')?.removeAttribute('aria-describedby');
  }
  for (const note of document.querySelectorAll('#train-form .mae-refusal')) note.remove();
  if (!action || action.kind !== 'error' || typeof action.field !== 'string') return;
  const id = 'field-' + action.field.replaceAll('_', '-');
  const more = document.getElementById('more-settings');
  const shut = more?.querySelector(':scope > [data-testid="accordion-content"]');
  if (more && shut && shut.style.display === 'none' && !document.getElementById(id)?.offsetParent) {
    more.querySelector(':scope > button.label-wrap')?.click();
  }
  let block = document.getElementById(id);
  for (let frame = 0; frame < 120 && !block?.offsetParent; frame++) {
    await new Promise((done) => requestAnimationFrame(done));  // opened, it renders its fields
    if (turn !== window.maeRefusalTurn) return;  // an edit (or another action) came meanwhile
    block = document.getElementById(id);
  }
  if (!block?.offsetParent) return;
  const reason = String(action.reason || action.text || '');
  block.setAttribute('data-refusal', reason);
  const note = Object.assign(document.createElement('div'),
                             {className: 'mae-refusal', id: id + '-refusal', textContent: reason});
  (block.closest('.form') || block).after(note);  // under the field's row: its block clips
  const input = block.querySelector('input, textarea');
  input?.setAttribute('aria-invalid', 'true');
  input?.setAttribute('aria-describedby', note.id);
  block.scrollIntoView({block: 'center'});
  // Not a dropdown: focused, it opens its list over the form.
  if (!block.querySelector('[role="listbox"], .secondary-wrap')) input?.focus({preventScroll: true});
}"""
