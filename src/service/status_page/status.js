// The status page: reads status.json every 2 s and draws it. Every value
// is put in with textContent, so nothing the service reports is read as HTML.
'use strict';

const TOKEN_KEY = 'txnflow.admin.token';
const REFRESH_MS = 2000;
const WINDOW_MS = 15 * 60 * 1000;
const MIN_WINDOW_MS = 60 * 1000;
let timer = null;

const $ = (selector) => document.querySelector(selector);

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(load, REFRESH_MS);
}

function showLogin(error) {
  clearTimeout(timer);
  $('#status').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = error;
  $('#token').focus();
}

async function load() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  let response;
  try {
    response = await fetch('status.json', { headers, cache: 'no-store' });
  } catch (error) {
    stale('the service does not answer');
    schedule();
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(token ? 'That token was refused.' : '');
    return;
  }
  try {
    if (!response.ok) throw new Error('status.json answered ' + response.status);
    render(await response.json());
  } catch (error) {
    stale(error.message);
  } finally {
    schedule();
  }
}

function stale(why) {
  const updated = $('#updated');
  updated.textContent = 'not updated: ' + why;
  updated.classList.add('stale');
}

const number = (value) => (value === null || value === undefined ? '–' : Number(value).toLocaleString('en'));

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.round(seconds);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min' + (s % 60 ? ' ' + (s % 60) + ' s' : '');
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}

function bytes(value) {
  if (value < 1024) return value + ' B';
  if (value < 1024 * 1024) return (value / 1024).toFixed(1) + ' KiB';
  return (value / 1024 / 1024).toFixed(1) + ' MiB';
}

const time = (iso) => new Date(iso).toLocaleTimeString('en-GB');

// One line chart: the series against time, over what the service has
// sampled (at least a minute, at most the last 15).
function chart(id, at, values) {
  const figure = $('#rate-' + id);
  const end = at.length ? at[at.length - 1] : Date.now();
  const span = Math.min(WINDOW_MS, Math.max(MIN_WINDOW_MS, at.length ? end - at[0] : 0));
  const max = Math.max(1, ...values);
  const points = values.map((value, i) => {
    const x = 300 * (1 - (end - at[i]) / span);
    const y = 78 - 76 * (value / max);
    return x.toFixed(1) + ',' + y.toFixed(1);
  });
  figure.querySelector('polyline').setAttribute('points', points.join(' '));
  figure.querySelector('.now').textContent = number(values.length ? values[values.length - 1] : 0);
  figure.querySelector('.max').textContent = 'max ' + number(max) + ' · last ' + duration(span / 1000);
}

function meter(id, value, max) {
  const element = $(id);
  element.max = Math.max(1, max);
  element.value = value;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function rows(table, items, fill) {
  const body = $(table + ' tbody');
  body.replaceChildren();
  for (const item of items) fill(body.insertRow(), item);
}

function progress(row, percent) {
  const td = row.insertCell();
  const bar = document.createElement('progress');
  bar.max = 100;
  if (percent !== null && percent !== undefined) bar.value = percent;
  td.append(bar, ' ' + (percent === null || percent === undefined ? '–' : percent.toFixed(1) + '%'));
}

// A batch or re-prediction run: its id, status, bar, time left and counts.
function runRow(row, run, counts) {
  row.dataset.runId = run.run_id;
  const id = cell(row, run.run_id);
  if (run.uri) id.title = run.uri;
  cell(row, run.status, 'run-status');
  progress(row, run.percent);
  cell(row, run.status === 'running' ? duration(run.eta_seconds) : '–');
  for (const count of counts) cell(row, number(run[count]), 'number');
}

function render(status) {
  $('#login').hidden = true;
  $('#status').hidden = false;
  $('#instance').textContent = status.instance + ' · group ' + status.group;
  const updated = $('#updated');
  updated.textContent = 'updated ' + time(status.generated_at);
  updated.classList.remove('stale');

  for (const series of ['in', 'written', 'predicted', 'dead_lettered']) {
    chart(series, status.rates.at, status.rates[series]);
  }

  meter('#buffer-meter', status.buffer.depth, status.buffer.max_records);
  $('#buffer').textContent = number(status.buffer.depth) + ' of ' + number(status.buffer.max_records) + ' (a flush)';
  meter('#records-meter', status.in_flight.records, status.in_flight.max_records);
  $('#in-flight-records').textContent = number(status.in_flight.records) + ' of ' + number(status.in_flight.max_records);
  meter('#bytes-meter', status.in_flight.bytes, status.in_flight.max_bytes);
  $('#in-flight-bytes').textContent = bytes(status.in_flight.bytes) + ' of ' + bytes(status.in_flight.max_bytes);

  const breaker = $('#breaker-state');
  breaker.textContent = status.breaker.state;
  breaker.className = 'state ' + status.breaker.state;
  const transitions = $('#breaker-transitions');
  transitions.replaceChildren(...status.breaker.transitions.map((t) => {
    const item = document.createElement('li');
    item.textContent = time(t.at) + ' ' + t.from + ' → ' + t.to;
    return item;
  }));
  const ms = (value) => (value === null ? '–' : number(value) + ' ms');
  $('#latency-window').textContent = duration(status.ml_api.window_seconds);
  $('#p50').textContent = ms(status.ml_api.p50_ms);
  $('#p95').textContent = ms(status.ml_api.p95_ms);
  $('#p99').textContent = ms(status.ml_api.p99_ms);
  $('#concurrency').textContent = number(status.ml_api.concurrency_limit) + ' of ' + number(status.ml_api.concurrency_max);

  $('#topic').textContent = status.topic;
  rows('#partitions', status.partitions.filter((p) => p.topic === status.topic), (row, p) => {
    row.dataset.partition = p.partition;
    cell(row, p.partition);
    cell(row, number(p.committed_offset), 'number');
    cell(row, number(p.lag), 'number lag');
  });

  const models = status.models;
  $('#model-current').textContent = models.current || '–';
  $('#model-shadow').textContent = models.shadow || 'none';
  $('#shadow-agreement').textContent =
    number(models.shadow_agreement.agree) + ' agree, ' + number(models.shadow_agreement.disagree) + ' disagree';
  rows('#models', models.versions, (row, v) => {
    cell(row, v.version);
    cell(row, number(v.live), 'number');
    cell(row, number(v.shadow), 'number');
  });

  rows('#batches', status.batches, (row, run) => runRow(row, run, ['read', 'written', 'dead_lettered']));
  rows('#repredictions', status.repredictions, (row, run) => runRow(row, run, ['selected', 'predicted', 'failed']));
  $('#runs-error').textContent = status.runs_error ? 'Runs unknown: ' + status.runs_error : '';

  rows('#dead-letters', status.dead_letters, (row, letter) => {
    cell(row, time(letter.at));
    cell(row, letter.error_type);
    cell(row, letter.stage);
    cell(row, letter.reason, 'reason');
    cell(row, letter.source, 'source');
    cell(row, letter.destination === 'dlq' ? 'DLQ topic' : 'dead_letters table');
  });
}

document.addEventListener('DOMContentLoaded', () => {
  $('#login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('#token').value);
    $('#token').value = '';
    load();
  });
  load();
});
