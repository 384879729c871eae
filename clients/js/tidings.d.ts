// Type declarations for /tidings.js (SPEC §11).

export type TransportName = 'websocket' | 'sse' | 'stream' | 'long-poll' | 'poll';

/** The transports in the default order of preference. */
export const TRANSPORTS: readonly TransportName[];

export interface TidingsOptions {
  /** Tried in this order; the client falls back to the next when one cannot connect. */
  transports?: TransportName[];
  /** A JWT (or API key): sent as `Authorization: Bearer`, and as `?token=` on the WebSocket handshake. */
  token?: string;
  /**
   * Asked for the token before every (re)connection (and once more after a 401): return a
   * fresh JWT so an expiring one (`token_expired`) is replaced. A throwing callback keeps the
   * last token and reports an `error` (code `token_error`).
   */
  getToken?: () => string | Promise<string>;
  /** Keep each channel's cursor across page reloads ('session') or browser restarts ('local'). */
  persist?: 'session' | 'local';
  /** Reconnect delays in ms: exponential from `min` to `max`; `jitter` (0–1) of each is random. */
  backoff?: { min?: number; max?: number; jitter?: number };
  /** How long a transport may take to connect before the next one is tried (ms, default 8000). */
  connectTimeout?: number;
  /** A stream silent (no data, no heartbeat) this long is considered dead (ms, default 45000). */
  heartbeatTimeout?: number;
  /** WebSocket application ping interval (ms, default 20000). */
  pingInterval?: number;
  /** Pause between short polls (ms, default 1000). */
  pollInterval?: number;
  /** Seconds a long poll may be held (default 25; the server caps it). */
  longPollWait?: number;
  /** Timeout of one request (publish, presence, history, a poll) in ms (default 15000). */
  requestTimeout?: number;
  /**
   * After falling back, probe the preferred transports this often (ms, default 60000, doubling
   * after a failed probe up to 10 min); one that works replaces the connection (a resume).
   * 0 turns probing off.
   */
  upgradeAfter?: number;
  /** How often publish() retries a publish whose outcome is unknown (default 3). */
  publishRetries?: number;
}

export interface PublishOptions {
  event?: string;
  /** Sent as `Idempotency-Key` on every attempt; default: a random UUID per publish() call. */
  idempotencyKey?: string;
  /** Overrides `publishRetries` for this call. */
  retries?: number;
}

/** A message as delivered: the envelope of SPEC §1. */
export interface Envelope<T = unknown> {
  channel: string;
  offset: number;
  epoch: string;
  /** This channel's cursor after the message: valid as `since`. */
  cursor: string;
  event?: string;
  /** JSON value, string, or base64 text when `encoding` is 'base64'. */
  data: T;
  encoding?: 'base64';
  /** Milliseconds since the Unix epoch, set by the broker. */
  time: number;
}

/**
 * Some messages are gone (SPEC §10). From here on the channel continues at `next_offset` of
 * `epoch`. `reason: 'cursor_rejected'` is the client's own: the server refused a stored cursor,
 * so the channel restarted from now (epoch and next_offset are then null).
 */
export interface GapNotice {
  channel: string;
  epoch: string | null;
  next_offset: number | null;
  reason: 'trimmed' | 'epoch_changed' | 'cursor_rejected' | string;
}

export interface PresenceEntry {
  channel?: string;
  client: string;
  user: string | null;
}

export interface Position {
  channel: string;
  offset: number;
  epoch: string;
  cursor: string;
  time: number;
}

export interface SubscribeOptions<T = unknown> {
  /** Replay the last N retained messages on a fresh subscription. */
  history?: number;
  /** Resume after this cursor (wins over `history` and over a persisted cursor). A poll's quoted ETag works too. */
  since?: string;
  /**
   * With `persist`, the stored cursor passes this message only once the handler returned, or
   * the promise it returned resolved. A handler that throws (or rejects) freezes the stored
   * cursor before that message for the rest of the page: the next load gets it again.
   */
  onMessage?(message: Envelope<T>): void | Promise<unknown>;
  onGap?(gap: GapNotice): void;
  /** Namespaces with `join_leave`: someone started or stopped following the channel. */
  onJoin?(who: PresenceEntry): void;
  onLeave?(who: PresenceEntry): void;
  /**
   * The server refused this channel (invalid name, forbidden, unauthorized): the subscription
   * has ended; the client's other subscriptions go on. `error.channel` names it.
   */
  onError?(error: TidingsError): void;
}

export type ConnectionState = 'connecting' | 'connected' | 'disconnected';

export interface StateEvent {
  state: ConnectionState;
  transport: TransportName | null;
}

export interface DisconnectEvent {
  reason: string;
  reconnect: boolean;
  transport: TransportName;
  /** The server's advised delay before reconnecting (a draining server spreads its clients). */
  reconnectAfterMs?: number;
}

export interface TidingsEvents {
  state: StateEvent;
  message: Envelope;
  gap: GapNotice;
  join: PresenceEntry;
  leave: PresenceEntry;
  /** The server said goodbye (shutdown, slow consumer…) before ending the connection. */
  disconnect: DisconnectEvent;
  /** Anything that went wrong: network, HTTP status, malformed frames, a throwing listener. */
  error: TidingsError;
}

export class TidingsError extends Error {
  /** HTTP status, when the server answered. */
  status?: number;
  /** The server's error code (`invalid_channel`, `presence_disabled`…) or the client's. */
  code?: string;
  transport?: TransportName | null;
  /** The subscription's channel, for errors of one subscription. */
  channel?: string;
  /** True when the server's own JSON error body came with the status (not a proxy's page). */
  tidings?: boolean;
  /** `Retry-After`, in ms. */
  retryAfter?: number;
}

export interface Subscription {
  readonly channel: string;
  /** The channel's cursor after the last message (or the subscription's start). */
  readonly cursor: string | null;
  readonly active: boolean;
  unsubscribe(): void;
}

export interface ClientStats {
  requests: number;
  bytes: number;
  messages: number;
  reconnects: number;
  gaps: number;
  errors: number;
}

export class Tidings {
  /** @param url the server's base URL; defaults to the page's origin. */
  constructor(url?: string, options?: TidingsOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** The transport in use or being tried. */
  readonly transport: TransportName | null;
  readonly stats: ClientStats;

  subscribe<T = unknown>(channel: string, options?: SubscribeOptions<T>): Subscription;
  /**
   * Publishes over the open `/ws` connection, or `POST /publish/{channel}`. A network error,
   * timeout, 429, 502, 503 (`outcome_unknown`, `broker_unavailable`) or 504 is retried with
   * backoff (and `Retry-After`), with the same `Idempotency-Key` every time.
   */
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<Position>;
  /** Over the open `/ws` connection, else `/api/channels/{c}/presence` (an API key under `[auth]`). */
  presence(channel: string): Promise<PresenceEntry[]>;
  /** Over the open `/ws` connection, else a one-channel short poll: subscribe rights suffice. `limit` defaults to 100. */
  history(
    channel: string,
    options?: { since?: string; limit?: number },
  ): Promise<{ messages: Envelope[]; cursor: string; gaps: GapNotice[] }>;

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof TidingsEvents>(event: K, listener: (payload: TidingsEvents[K]) => void): () => void;
  off<K extends keyof TidingsEvents>(event: K, listener: (payload: TidingsEvents[K]) => void): void;

  /** The token for the next connection and request (use with or instead of `getToken`). */
  setToken(token: string | undefined): void;
  /** Drops the connection (the state is 'disconnected' at once) and reconnects after the backoff, resuming every subscription. */
  reconnect(): void;
  /** Ends every subscription and the connection; the state ends as 'disconnected'. */
  close(): void;
}

/** Delay before reconnect attempt `attempt` (0-based), with equal jitter. */
export function backoffDelay(
  attempt: number,
  options?: { min?: number; max?: number; jitter?: number },
  random?: () => number,
): number;

/** The one-channel part of a (multi-channel) cursor, or null when it does not cover the channel. */
export function cursorFor(cursor: string, channel: string): string | null;
/**
 * One cursor covering every given one (later ones win for the same channel); null when some
 * have a layout this client does not know and they cannot be combined.
 */
export function mergeCursors(cursors: (string | null | undefined)[]): string | null;
/** A cursor without the quotes of its ETag form. */
export function normalizeCursor(cursor: string): string | null;
/** A `Retry-After` value (seconds or HTTP date) in ms, at most ten minutes. */
export function retryAfterMs(value: string | null | undefined, now?: number): number | undefined;
export function channelHash(name: string): bigint;

export class SseParser {
  push(text: string): Array<{ event: string; data: string; id?: string; hasData: boolean } | { comment: string } | { retry: number }>;
}
export class NdjsonParser {
  push(text: string): Array<{ value: unknown } | { heartbeat: true } | { error: string; line: string }>;
}

export default Tidings;
