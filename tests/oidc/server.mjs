// oidc-provider (a certified OpenID Provider implementation) on loopback, for tests/test_oidc_provider.py.
//
// Configured from the environment:
//   CONSOLE_REDIRECT  the Tether console's /auth/callback URL (client "tether-console", code + PKCE)
//   APP_REDIRECT      the agent application's redirect URL (client "renewal-app": the person's ID token)
//   AGENTS            comma-separated client ids of agents (client_credentials, secret "<id>-secret")
// Agents' access tokens are JWTs for the resource "urn:tether" with aud "tether" (RFC 9068).
// Accounts: any login works (devInteractions); logins starting with "rita" are in the group "reviewer".
// POST /__rotate makes a new signing key (published with the old ones) and signs with it from then on,
// without restarting (the provider object is rebuilt around the same in-memory storage).
// Prints one JSON line {"event":"ready","issuer":...} on stdout when listening.
import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const host = '127.0.0.1';
const agents = (process.env.AGENTS || 'agent-bot').split(',').filter(Boolean);
let keys = [];

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `k-${crypto.randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

function build(issuer) {
  const config = {
    clients: [
      ...agents.map((id) => ({
        client_id: id, client_secret: `${id}-secret`, grant_types: ['client_credentials'],
        response_types: [], redirect_uris: [], scope: 'tether',
      })),
      {
        client_id: 'tether-console', client_secret: 'console-secret', grant_types: ['authorization_code'],
        response_types: ['code'], redirect_uris: [process.env.CONSOLE_REDIRECT],
      },
      {
        client_id: 'renewal-app', client_secret: 'app-secret', grant_types: ['authorization_code'],
        response_types: ['code'], redirect_uris: [process.env.APP_REDIRECT],
      },
    ],
    jwks: { keys },
    cookies: { keys: ['test-cookie-key-0123456789'] },
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
    scopes: ['openid', 'email', 'profile', 'groups', 'tether'],
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client) => (agents.includes(client.clientId) ? 'urn:tether' : undefined),
        getResourceServerInfo: () => ({
          scope: 'tether', audience: 'tether', accessTokenFormat: 'jwt', accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        }),
        useGrantedResource: () => false,
      },
    },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: `${id}@acme.example`, email_verified: true, name: id,
            groups: id.startsWith('rita') ? ['reviewer'] : ['sales'] };
        },
      };
    },
    // first-party test clients: consent is implied (the documented "skip consent" recipe)
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
      grant.addOIDCScope('openid email profile groups');
      await grant.save();
      return grant;
    },
    ttl: { IdToken: 300, AccessToken: 600, ClientCredentials: 600, AuthorizationCode: 60 },
  };
  const provider = new Provider(issuer, config);
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return provider;
}

let handler = null;
const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/__rotate') {
    keys = [newKey(), ...keys];
    handler = build(issuerOf()).callback();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kid: keys[0].kid, kids: keys.map((k) => k.kid) }));
    return;
  }
  handler(req, res);
});
function issuerOf() { return `http://${host}:${server.address().port}`; }

keys = [newKey()];
server.listen(Number(process.env.PORT || 0), host, () => {
  handler = build(issuerOf()).callback();
  process.stdout.write(JSON.stringify({ event: 'ready', issuer: issuerOf(), kid: keys[0].kid }) + '\n');
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
